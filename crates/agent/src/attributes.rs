//! Reading a node's attributes: a directory of files, one attribute per file (name = file
//! name, value = content), the Mesos agent layout; a Mesos `attributes` *file*
//! (`name:value;name:value`) is read too. Then `--attribute name=value` flags, which win.
//!
//! Anything unreadable is an error naming the file, never silently skipped: an attribute
//! that is there but not seen would change what the node contributes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tessera_core::deploy::{MAX_ATTRIBUTE_NAME_BYTES, MAX_ATTRIBUTE_VALUE_BYTES, MAX_NODE_ATTRIBUTES};

/// Where attributes are read from when no `--attributes-dir` is given.
pub const DEFAULT_ATTRIBUTE_DIRS: [&str; 2] = ["/etc/mesos-slave/attributes", "/etc/tessera/attributes"];

/// Attributes and the sources they came from (for error messages).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub values: BTreeMap<String, String>,
    /// Problems found reading them; the node reports them and the planner leaves it alone.
    pub errors: Vec<String>,
}

/// Reads every source in order; a later source may not contradict an earlier one, except
/// flags, which override files.
pub fn read_attributes(sources: &[PathBuf], flags: &[String]) -> Attributes {
    let mut out = Attributes::default();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    for source in sources {
        let found = match std::fs::metadata(source) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.errors.push(format!("{}: {e}", source.display()));
                continue;
            }
            Ok(m) if m.is_dir() => read_dir(source, &mut out.errors),
            Ok(_) => read_mesos_file(source, &mut out.errors),
        };
        for (name, value, from) in found {
            match out.values.get(&name) {
                Some(v) if *v != value => out.errors.push(format!(
                    "attribute {name} is {v:?} in {} but {value:?} in {from}",
                    origin.get(&name).map(String::as_str).unwrap_or("?")
                )),
                _ => {
                    origin.insert(name.clone(), from);
                    out.values.insert(name, value);
                }
            }
        }
    }
    for flag in flags {
        match flag.split_once('=') {
            Some((name, value)) if check_name(name.trim()).is_ok() => {
                out.values.insert(name.trim().to_string(), value.trim().to_string());
            }
            Some((name, _)) => {
                out.errors.push(format!("--attribute {flag:?}: {}", check_name(name.trim()).err().unwrap_or_default()))
            }
            None => out.errors.push(format!("--attribute {flag:?}: expected name=value")),
        }
    }
    if out.values.len() > MAX_NODE_ATTRIBUTES {
        out.errors.push(format!("{} attributes; at most {MAX_NODE_ATTRIBUTES} are supported", out.values.len()));
        out.values.clear();
    }
    out
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_ATTRIBUTE_NAME_BYTES {
        return Err(format!("an attribute name is 1 to {MAX_ATTRIBUTE_NAME_BYTES} bytes"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("character {c:?} not allowed in an attribute name"));
    }
    Ok(())
}

/// One attribute per regular file. Hidden files (editor swap files) are ignored;
/// directories, unreadable, oversized or non-UTF-8 files are errors.
fn read_dir(dir: &Path, errors: &mut Vec<String>) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(format!("{}: {e}", dir.display()));
            return out;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            errors.push(format!("{}: the file name is not UTF-8", path.display()));
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if let Err(e) = check_name(&name) {
            errors.push(format!("{}: {e}", path.display()));
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_file() => {
                errors.push(format!("{}: not a regular file", path.display()));
                continue;
            }
            Ok(m) if m.len() > MAX_ATTRIBUTE_VALUE_BYTES as u64 => {
                errors.push(format!("{}: larger than {MAX_ATTRIBUTE_VALUE_BYTES} bytes", path.display()));
                continue;
            }
            Err(e) => {
                errors.push(format!("{}: {e}", path.display()));
                continue;
            }
            Ok(_) => {}
        }
        match std::fs::read(&path).map(String::from_utf8) {
            Ok(Ok(text)) if text.contains('\0') => errors.push(format!("{}: contains a NUL byte", path.display())),
            Ok(Ok(text)) => out.push((name, text.trim().to_string(), path.display().to_string())),
            Ok(Err(_)) => errors.push(format!("{}: not UTF-8 text", path.display())),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    out
}

/// The Mesos agent's `--attributes` format: `name:value;name:value`.
fn read_mesos_file(path: &Path, errors: &mut Vec<String>) -> Vec<(String, String, String)> {
    let text = match std::fs::read(path).map(String::from_utf8) {
        Ok(Ok(t)) if t.len() <= MAX_ATTRIBUTE_VALUE_BYTES * 4 => t,
        Ok(Ok(_)) => {
            errors.push(format!("{}: too large", path.display()));
            return Vec::new();
        }
        Ok(Err(_)) => {
            errors.push(format!("{}: not UTF-8 text", path.display()));
            return Vec::new();
        }
        Err(e) => {
            errors.push(format!("{}: {e}", path.display()));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for item in text.trim().split(';').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once(':') {
            Some((name, value)) if check_name(name.trim()).is_ok() => {
                out.push((name.trim().to_string(), value.trim().to_string(), path.display().to_string()))
            }
            _ => errors.push(format!("{}: {item:?} is not name:value", path.display())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-attr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn directory_files_and_flags() {
        let d = tmpdir("dir");
        std::fs::write(d.join("scaleio-sds-domains"), "mydomain\n").unwrap();
        std::fs::write(d.join("rack"), "  r1 \n").unwrap();
        std::fs::write(d.join(".rack.swp"), "junk").unwrap();
        let a = read_attributes(&[d.clone(), d.join("absent")], &["row=b".into(), "rack=r2".into()]);
        assert!(a.errors.is_empty(), "{:?}", a.errors);
        assert_eq!(a.values["scaleio-sds-domains"], "mydomain");
        assert_eq!(a.values["rack"], "r2", "flags override files");
        assert_eq!(a.values["row"], "b");
        assert_eq!(a.values.len(), 3);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let d = tmpdir("bad");
        std::fs::write(d.join("bin"), [0xff, 0xfe]).unwrap();
        std::fs::write(d.join("big"), vec![b'a'; MAX_ATTRIBUTE_VALUE_BYTES + 1]).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("bad name"), "x").unwrap();
        let a = read_attributes(std::slice::from_ref(&d), &["novalue".into(), "bad key=1".into()]);
        let all = a.errors.join("\n");
        for want in [
            "bin: not UTF-8",
            "big: larger than",
            "sub: not a regular file",
            "bad name: character ' '",
            "\"novalue\": expected name=value",
            "\"bad key=1\": character",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn mesos_attribute_file_and_contradictions() {
        let d = tmpdir("mesos");
        std::fs::write(d.join("attributes"), "rack:r1; row:a\n").unwrap();
        let dir2 = d.join("more");
        std::fs::create_dir(&dir2).unwrap();
        std::fs::write(dir2.join("rack"), "r9").unwrap();
        let a = read_attributes(&[d.join("attributes"), dir2], &[]);
        assert_eq!(a.values["row"], "a");
        assert!(
            a.errors.iter().any(|e| e.contains("attribute rack is \"r1\"") && e.contains("\"r9\"")),
            "{:?}",
            a.errors
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
