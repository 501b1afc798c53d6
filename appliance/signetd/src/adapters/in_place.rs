//! A spooled input made into its signed file where it lies, from the agent's patch
//! (`signet_api::wire::patch`), and made back into the input when that was not
//! committed.
//!
//! Signing a PE changes two header fields and what follows its content, so the
//! signed file is written as those changes over the spooled input (`<id>.in`) and then
//! renamed to the result (`<id>.out`): a few KiB written and flushed instead of a copy
//! of the whole file. The input must survive until the job is committed `signed` (a
//! crash before that sends it to the agent again), so before the first byte changes,
//! the bytes about to be overwritten are kept, flushed, in `<id>.undo`, itself a patch:
//! applied to the file in any state the forward patch left it in, it gives the input
//! back. [`restore`] does that, for a failed attempt and at start.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use signet_api::wire::patch::{Checked, Patch};

use crate::adapters::store::sync_dir;

/// The most bytes of the input after the part the signed file keeps (a signature the
/// file had) that are kept aside to undo the change; past it the signed file is made
/// as a copy.
pub const UNDO_MAX: u64 = 1 << 20;

/// Where the undo of job `spool/<stem>` is kept.
pub fn undo_path(input: &Path) -> PathBuf {
    input.with_extension("undo")
}

/// Whether a patch of the input of `len` bytes is made in place (what it overwrites
/// is at most [`UNDO_MAX`]).
pub fn fits(patch: &Checked, len: u64) -> bool {
    len.saturating_sub(patch.keep()) <= UNDO_MAX
}

/// Writes `patch` over the file: its edits, cut at the bytes kept, its tail after
/// them; flushed. Whatever of this was done before, the file ends the same.
fn apply(file: &File, patch: &Checked) -> std::io::Result<()> {
    for (at, bytes) in patch.edits() {
        file.write_all_at(bytes, *at)?;
    }
    file.set_len(patch.keep())?;
    file.write_all_at(patch.tail(), patch.keep())?;
    file.sync_all()
}

/// Makes the spooled input `input` (of `len` bytes) the signed file `output` as
/// `patch` says: the undo kept and flushed first, the patch written over the input,
/// the file renamed. On an error the input is made back ([`restore`]); when even that
/// fails, the undo stays for the next start and the error says so.
pub fn make(input: &Path, output: &Path, len: u64, patch: &Checked) -> std::io::Result<()> {
    let undo = undo_path(input);
    let file = OpenOptions::new().read(true).write(true).open(input)?;
    if file.metadata()?.len() != len {
        return Err(std::io::Error::other(
            "the spooled input is not the length recorded for it",
        ));
    }
    let mut edits = Vec::with_capacity(patch.edits().len());
    for (at, bytes) in patch.edits() {
        let mut was = vec![0u8; bytes.len()];
        file.read_exact_at(&mut was, *at)?;
        edits.push((*at, was));
    }
    let mut tail = vec![0u8; usize::try_from(len - patch.keep()).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut tail, patch.keep())?;
    let edits: Vec<(u64, &[u8])> = edits.iter().map(|(at, b)| (*at, b.as_slice())).collect();
    let back = serde_json::to_vec(&Patch::new(patch.keep(), &edits, &tail))?;
    let tmp = input.with_extension("undo.tmp");
    {
        let mut f = File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &back)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &undo)?;
    let dir = input.parent().unwrap_or(Path::new("."));
    sync_dir(dir)?;
    let forward = apply(&file, patch)
        .and_then(|()| std::fs::rename(input, output))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = forward {
        return match restore(input, output) {
            Ok(_) => Err(e),
            Err(r) => Err(std::io::Error::other(format!(
                "{e}; and the input could not be made back ({r}): it is at the next start"
            ))),
        };
    }
    Ok(())
}

/// Makes the input back from its undo, if it has one: the file (at `input`, or at
/// `output` once renamed) gets the bytes the patch overwrote, is cut to its length
/// and is named `input` again; the undo is removed. True when there was one.
pub fn restore(input: &Path, output: &Path) -> std::io::Result<bool> {
    let undo = undo_path(input);
    let mut text = Vec::new();
    match File::open(&undo) {
        Ok(mut f) => f.read_to_end(&mut text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let back: Patch = serde_json::from_slice(&text).map_err(std::io::Error::other)?;
    let at = if input.exists() { input } else { output };
    let file = OpenOptions::new().write(true).open(at)?;
    // The forward change never cuts the file below the bytes it keeps.
    let len = file.metadata()?.len();
    let back = back.check(len).map_err(std::io::Error::other)?;
    apply(&file, &back)?;
    if at != input {
        std::fs::rename(at, input)?;
    }
    std::fs::remove_file(&undo)?;
    sync_dir(input.parent().unwrap_or(Path::new(".")))?;
    Ok(true)
}

/// Drops the undo of a job committed signed: its input is not needed again.
pub fn done(input: &Path) {
    let _ = std::fs::remove_file(undo_path(input));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An input of 5000 bytes with a "signature" after 4000, and the patch that signs it.
    fn case(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>, Checked, Vec<u8>) {
        let input = dir.join("7.in");
        let output = dir.join("7.out");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&input, &data).unwrap();
        let patch = Patch::new(4000, &[(88, &[1, 2, 3, 4]), (152, &[9; 8])], &[7; 1234])
            .check(5000)
            .unwrap();
        let mut signed = data[..4000].to_vec();
        signed[88..92].copy_from_slice(&[1, 2, 3, 4]);
        signed[152..160].copy_from_slice(&[9; 8]);
        signed.extend_from_slice(&[7; 1234]);
        (input, output, data, patch, signed)
    }

    #[test]
    fn the_input_becomes_the_signed_file_and_its_undo_gives_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output, data, patch, signed) = case(dir.path());
        assert!(fits(&patch, 5000));
        make(&input, &output, 5000, &patch).unwrap();
        assert!(!input.exists());
        assert_eq!(std::fs::read(&output).unwrap(), signed);
        assert!(
            undo_path(&input).exists(),
            "kept until the job is committed"
        );

        // Not committed (a crash, a failed commit): the input comes back, and once.
        assert!(restore(&input, &output).unwrap());
        assert_eq!(std::fs::read(&input).unwrap(), data);
        assert!(!output.exists() && !undo_path(&input).exists());
        assert!(!restore(&input, &output).unwrap());

        // Committed: the undo goes.
        make(&input, &output, 5000, &patch).unwrap();
        done(&input);
        assert!(!undo_path(&input).exists());
        assert_eq!(std::fs::read(&output).unwrap(), signed);
    }

    #[test]
    fn an_input_stopped_at_any_step_is_given_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output, data, patch, _) = case(dir.path());
        // Stopped after the undo was kept: some edits written, cut or not, the tail
        // written or not, renamed or not.
        type Step = fn(&File, &Checked);
        let steps: [Step; 4] = [
            |_, _| {},
            |f, p| f.write_all_at(&p.edits()[0].1, p.edits()[0].0).unwrap(),
            |f, p| f.set_len(p.keep()).unwrap(),
            |f, p| {
                f.set_len(p.keep()).unwrap();
                f.write_all_at(&p.tail()[..100], p.keep()).unwrap();
            },
        ];
        for (i, step) in steps.iter().enumerate() {
            for renamed in [false, true] {
                std::fs::write(&input, &data).unwrap();
                make(&input, &output, 5000, &patch).unwrap();
                // Back to the moment the undo was written, then the step.
                std::fs::rename(&output, &input).unwrap();
                let f = OpenOptions::new().write(true).open(&input).unwrap();
                f.set_len(0).unwrap();
                f.write_all_at(&data, 0).unwrap();
                step(&f, &patch);
                if renamed {
                    std::fs::rename(&input, &output).unwrap();
                }
                assert!(restore(&input, &output).unwrap(), "step {i}");
                assert_eq!(
                    std::fs::read(&input).unwrap(),
                    data,
                    "step {i} renamed {renamed}"
                );
                assert!(!output.exists());
            }
        }
    }

    #[test]
    fn an_input_of_another_length_is_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output, data, patch, _) = case(dir.path());
        let e = make(&input, &output, 4999, &patch).unwrap_err();
        assert!(e.to_string().contains("not the length"), "{e}");
        assert_eq!(std::fs::read(&input).unwrap(), data);
        assert!(!undo_path(&input).exists());
    }
}
