//! Waiting for several futures at once without spawning: the flush fan-out of the SDC and
//! the SDS borrows its caller's state, so its calls cannot be `'static` tasks. (A whole
//! `futures` crate for this one combinator is not worth its build time.)

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Runs every future concurrently on the current task; returns their outputs in order.
/// Each future is polled only when the task is woken, so this costs nothing while waiting.
pub async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("every future completed")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outputs_come_back_in_order_whatever_finishes_first() {
        let delays = [30u64, 1, 10];
        let got = join_all(delays.iter().map(|&ms| async move {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            ms
        }))
        .await;
        assert_eq!(got, vec![30, 1, 10]);
    }
}
