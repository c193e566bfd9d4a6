//! External programs (nbdfuse, losetup, mkfs, mount, umount) with a timeout each: a hung
//! tool fails the step with a clear error instead of hanging the service (REX-Ray #364,
//! mesos-module-dvdi #88).

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StepError {
    #[error("{step}: cannot run {program}: {source} (is it installed? scripts/install-deps.sh installs it)")]
    Spawn { step: String, program: String, source: std::io::Error },
    #[error("{step}: {program} did not finish within {timeout:?}; killed it")]
    Timeout { step: String, program: String, timeout: Duration },
    #[error("{step}: {program} failed ({status}): {stderr}")]
    Failed { step: String, program: String, status: String, stderr: String },
}

/// Runs `program args` with stdin closed; returns its stdout (trimmed) on success.
pub async fn run(step: &str, program: &str, args: &[&str], timeout: Duration) -> Result<String, StepError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let child = cmd.output();
    let out = match tokio::time::timeout(timeout, child).await {
        Err(_) => return Err(StepError::Timeout { step: step.into(), program: program.into(), timeout }),
        Ok(Err(source)) => return Err(StepError::Spawn { step: step.into(), program: program.into(), source }),
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
        return Err(StepError::Failed {
            step: step.into(),
            program: program.into(),
            status: out.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
