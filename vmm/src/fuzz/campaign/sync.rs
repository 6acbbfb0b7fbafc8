//! AFL++'s sync between instances sharing one output directory `OUT`:
//! each instance writes only `OUT/NAME`, and every so often reads the new
//! entries of its siblings' `OUT/*/queue`. What it has looked at is kept
//! in `OUT/NAME/.synced/SIBLING`: the next id to look at, as 4 bytes in the
//! host's order (AFL's own file, so afl-fuzz instances can share `OUT`).
//! A main instance (`-M`, marked by `OUT/NAME/is_main_node`) imports from
//! every sibling; a secondary (`-S`) only from main instances, or from all
//! of them when no sibling is a main instance.

use std::path::{Path, PathBuf};

use super::CampaignError;

/// A sibling's queue entries not looked at yet.
#[derive(Debug)]
pub struct Pending {
    /// The sibling's name (its directory in `OUT`).
    pub sibling: String,
    /// Its entries from the last mark on, by id.
    pub entries: Vec<(u32, PathBuf)>,
}

/// Reads siblings' queues for one instance.
#[derive(Debug)]
pub struct Syncer {
    out: PathBuf,
    own: String,
    main: bool,
}

impl Syncer {
    /// The syncer of instance `own` in `out`.
    pub fn new(out: &Path, own: &str, main: bool) -> Self {
        Syncer {
            out: out.to_path_buf(),
            own: own.to_string(),
            main,
        }
    }

    /// The siblings this instance imports from.
    fn siblings(&self) -> Result<Vec<String>, CampaignError> {
        let dir = std::fs::read_dir(&self.out).map_err(|e| CampaignError::Io {
            what: format!("cannot list {}", self.out.display()),
            source: e,
        })?;
        let mut all: Vec<(String, bool)> = dir
            .filter_map(Result::ok)
            .filter_map(|d| d.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.') && *n != self.own)
            .filter(|n| self.out.join(n).join("queue").is_dir())
            .map(|n| {
                let main = self.out.join(&n).join("is_main_node").exists();
                (n, main)
            })
            .collect();
        all.sort();
        let any_main = all.iter().any(|(_, m)| *m);
        Ok(all
            .into_iter()
            .filter(|(_, m)| self.main || *m || !any_main)
            .map(|(n, _)| n)
            .collect())
    }

    fn mark_path(&self, sibling: &str) -> PathBuf {
        self.out.join(&self.own).join(".synced").join(sibling)
    }

    /// The next id to look at in `sibling`'s queue.
    pub fn mark(&self, sibling: &str) -> u32 {
        std::fs::read(self.mark_path(sibling))
            .ok()
            .and_then(|b| {
                b.get(..4)
                    .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
            })
            .unwrap_or(0)
    }

    /// Records that `sibling`'s entries before `next` were looked at.
    pub fn done(&self, sibling: &str, next: u32) -> Result<(), CampaignError> {
        let path = self.mark_path(sibling);
        std::fs::write(&path, next.to_ne_bytes()).map_err(|e| CampaignError::Io {
            what: format!("cannot write {}", path.display()),
            source: e,
        })
    }

    /// Every sibling's entries from its mark on.
    pub fn pending(&self) -> Result<Vec<Pending>, CampaignError> {
        let mut out = Vec::new();
        for sibling in self.siblings()? {
            let mark = self.mark(&sibling);
            let queue = self.out.join(&sibling).join("queue");
            let Ok(dir) = std::fs::read_dir(&queue) else {
                continue;
            };
            let mut entries: Vec<(u32, PathBuf)> = dir
                .filter_map(Result::ok)
                .filter_map(|d| {
                    let id = d.file_name().to_str().and_then(queue_id)?;
                    (id >= mark).then(|| (id, d.path()))
                })
                .collect();
            entries.sort();
            if !entries.is_empty() {
                out.push(Pending { sibling, entries });
            }
        }
        Ok(out)
    }
}

/// The id of a queue file name `id:NNNNNN[,...]`.
pub fn queue_id(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("id:")?;
    let digits = rest.split(',').next()?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::mock::scratch_dir;

    fn instance(out: &Path, name: &str, main: bool, ids: &[u32]) {
        let q = out.join(name).join("queue");
        std::fs::create_dir_all(&q).unwrap();
        std::fs::create_dir_all(out.join(name).join(".synced")).unwrap();
        if main {
            std::fs::write(out.join(name).join("is_main_node"), b"").unwrap();
        }
        for id in ids {
            std::fs::write(q.join(format!("id:{id:06},src:000000,op:havoc")), b"x").unwrap();
        }
        std::fs::write(q.join(".state"), b"").unwrap();
    }

    #[test]
    fn queue_names_parse() {
        assert_eq!(queue_id("id:000012,src:000003"), Some(12));
        assert_eq!(queue_id("id:1234567"), Some(1_234_567));
        assert_eq!(queue_id("id:12"), None);
        assert_eq!(queue_id("README.txt"), None);
        assert_eq!(queue_id("id:00001x,a"), None);
    }

    #[test]
    fn new_entries_of_siblings_and_marks() {
        let out = scratch_dir("sync-marks");
        instance(&out, "m", true, &[0, 1, 2]);
        instance(&out, "s1", false, &[0, 1]);
        instance(&out, "s2", false, &[0]);
        std::fs::create_dir_all(out.join(".hidden/queue")).unwrap();

        // The main instance imports from both secondaries.
        let m = Syncer::new(&out, "m", true);
        let p = m.pending().unwrap();
        let names: Vec<_> = p.iter().map(|p| p.sibling.as_str()).collect();
        assert_eq!(names, ["s1", "s2"]);
        assert_eq!(p[0].entries.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1]);
        m.done("s1", 2).unwrap();
        assert_eq!(m.mark("s1"), 2);
        assert_eq!(
            std::fs::read(out.join("m/.synced/s1")).unwrap(),
            2u32.to_ne_bytes()
        );
        let p = m.pending().unwrap();
        assert_eq!(p.len(), 1, "nothing new in s1");
        instance(&out, "s1", false, &[2]);
        assert_eq!(m.pending().unwrap()[0].entries.len(), 1);

        // A secondary imports from the main instance only.
        let s = Syncer::new(&out, "s1", false);
        let p = s.pending().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].sibling, "m");
        assert_eq!(p[0].entries.len(), 3);

        // Without a main instance, secondaries import from each other.
        std::fs::remove_file(out.join("m/is_main_node")).unwrap();
        let p = s.pending().unwrap();
        assert_eq!(
            p.iter().map(|p| p.sibling.as_str()).collect::<Vec<_>>(),
            ["m", "s2"]
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}
