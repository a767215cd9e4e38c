//! Ownership and mode checks on the files keygate trusts (SPEC §9 "Files"), as ssh does: a data
//! dir others can write to, or a master key or token file others can read (or that another user
//! owns), is refused with the file's name and the command that fixes it. Used by the control
//! plane and by both data planes (`keygate authz` and the Envoy module). Depends on nothing.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file or directory keygate will not trust, or one it could not inspect.
#[derive(Debug, thiserror::Error)]
pub enum PermError {
    #[error("{setting} {path} {problem}; fix it with `{fix}`")]
    Unsafe {
        setting: String,
        path: String,
        problem: String,
        fix: String,
    },
    #[error("{setting} {path}: {source}")]
    Io {
        setting: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Refuses a directory that group or others can write to, or that another user owns (root is
/// trusted, as by ssh). A missing directory passes: keygate creates it private.
pub fn check_private_dir(dir: &Path, setting: &str) -> Result<(), PermError> {
    let Some(meta) = metadata(dir, setting)? else {
        return Ok(());
    };
    owned_by_us(dir, setting, &meta)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(unsafe_file(
            dir,
            setting,
            format!("is writable by group or others (mode {mode:04o})"),
            format!("chmod 700 {}", dir.display()),
        ));
    }
    Ok(())
}

/// Refuses a key or token file that group or others can read or write, or that another user
/// owns (root is trusted). A missing file passes: reading it reports that.
pub fn check_secret_file(path: &Path, setting: &str) -> Result<(), PermError> {
    let Some(meta) = metadata(path, setting)? else {
        return Ok(());
    };
    owned_by_us(path, setting, &meta)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(unsafe_file(
            path,
            setting,
            format!("is accessible by group or others (mode {mode:04o})"),
            format!("chmod 600 {}", path.display()),
        ));
    }
    Ok(())
}

fn metadata(path: &Path, setting: &str) -> Result<Option<std::fs::Metadata>, PermError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PermError::Io {
            setting: setting.into(),
            path: path.display().to_string(),
            source,
        }),
    }
}

fn owned_by_us(path: &Path, setting: &str, meta: &std::fs::Metadata) -> Result<(), PermError> {
    let Some(me) = process_uid() else {
        return Ok(());
    };
    let owner = meta.uid();
    if owner == me || owner == 0 {
        return Ok(());
    }
    Err(unsafe_file(
        path,
        setting,
        format!("is owned by uid {owner}, not by keygate's user (uid {me}) or root"),
        format!("chown {me} {}", path.display()),
    ))
}

/// The process's effective uid: the owner of `/proc/self` (Linux). Without procfs the owner
/// check is skipped (the mode checks still apply).
fn process_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn unsafe_file(path: &Path, setting: &str, problem: String, fix: String) -> PermError {
    PermError::Unsafe {
        setting: setting.into(),
        path: path.display().to_string(),
        problem,
        fix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn modes_are_checked_as_ssh_does() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        check_private_dir(&d, "--data-dir").unwrap();
        std::fs::create_dir(&d).unwrap();
        for ok in [0o700, 0o750, 0o755] {
            chmod(&d, ok);
            check_private_dir(&d, "--data-dir").unwrap();
        }
        for bad in [0o770, 0o777, 0o702] {
            chmod(&d, bad);
            let e = check_private_dir(&d, "--data-dir").unwrap_err().to_string();
            assert!(e.contains("--data-dir") && e.contains("chmod 700"), "{e}");
        }
        let f = dir.path().join("master.key");
        check_secret_file(&f, "--master-key-file").unwrap();
        std::fs::write(&f, "x").unwrap();
        for ok in [0o600, 0o400] {
            chmod(&f, ok);
            check_secret_file(&f, "--master-key-file").unwrap();
        }
        for bad in [0o644, 0o640, 0o604, 0o620] {
            chmod(&f, bad);
            let e = check_secret_file(&f, "--master-key-file")
                .unwrap_err()
                .to_string();
            assert!(e.contains("master.key") && e.contains("chmod 600"), "{e}");
        }
    }

    #[test]
    fn another_users_file_is_refused_when_we_can_tell() {
        let Some(me) = process_uid() else { return };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "x").unwrap();
        chmod(&f, 0o600);
        let other = if me == 0 { 65534 } else { me };
        // Only root can give a file away; as another user this checks our own file passes.
        if std::os::unix::fs::chown(&f, Some(other), None).is_ok() && other != me {
            let e = check_secret_file(&f, "--token").unwrap_err().to_string();
            assert!(
                e.contains("owned by uid 65534") && e.contains("chown"),
                "{e}"
            );
        } else {
            check_secret_file(&f, "--token").unwrap();
        }
    }
}
