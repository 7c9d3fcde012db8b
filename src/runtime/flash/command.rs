//! `--flash command:CMD`: an installer run over the verified image, under
//! the state directory's installer lock (never two at once, also across a
//! crash of the agent: [`crate::exec::GroupLock`]).

use crate::exec::{run_shell_exclusive, shell_quote};
use fwagent_state::{result_no, Failure, Firmware};
use std::path::Path;
use std::time::Duration;

/// What the installer and the commit command learn of the image from their
/// environment: `FWAGENT_MD5`, `FWAGENT_SIZE`.
pub(super) fn firmware_env(firmware: &Firmware) -> [(&'static str, String); 2] {
    [
        ("FWAGENT_MD5", firmware.md5.clone()),
        ("FWAGENT_SIZE", firmware.size.to_string()),
    ]
}

/// Run the installer `cmd` over `image`, under `lock`.
pub fn install(
    cmd: &str,
    image: &Path,
    firmware: &Firmware,
    timeout: Duration,
    lock: &Path,
) -> Result<(), Failure> {
    let quoted = shell_quote(&image.to_string_lossy());
    let line = if cmd.contains("{image}") {
        cmd.replace("{image}", &quoted)
    } else {
        format!("{cmd} {quoted}")
    };
    let [md5, size] = firmware_env(firmware);
    let envs = [
        ("FWAGENT_IMAGE", image.to_string_lossy().into_owned()),
        md5,
        size,
    ];
    let ran = run_shell_exclusive(lock, "installer", &line, &envs, timeout, "mid-install")
        .map_err(|e| {
            Failure::new(
                result_no::FLASH_FAILED,
                format!("cannot run the installer: {e}"),
                false,
            )
        })?;
    if ran.success() {
        Ok(())
    } else {
        Err(Failure::new(
            result_no::FLASH_FAILED,
            format!("the installer failed: {}", ran.describe(timeout)),
            false,
        ))
    }
}
