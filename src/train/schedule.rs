//! Runs a graph of jobs (`train all`'s stages), up to `jobs` at once, each
//! starting once the jobs it needs have ended.
//!
//! Why: a decoder stage gains only ~1.1x from a second core here (candle's
//! matmuls at these sizes hand off more than they share), while
//! `vq_decoder` and `base`, or the three semantic adapters, never read each
//! other's products. Two stages side by side, one core each, keep both
//! cores busy. Which stages overlap changes no weight: each stage is a
//! function of the products it reads, for any thread count
//! ([`super::threads`]).
//!
//! Invariants:
//! - a job starts only after every job it needs ended without error;
//! - after an error no job starts; those running finish, and the first
//!   error is returned, naming its job;
//! - each job is told how many threads it may use: the cores shared among
//!   the jobs started together with it and those already running.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use super::threads::MatmulThreads;

/// The work of a job, given the threads it may use.
pub type Work<'a> = Box<dyn Fn(usize) -> Result<()> + Send + Sync + 'a>;

pub struct Job<'a> {
    pub name: &'static str,
    /// Jobs that must end first; each listed before this one.
    pub needs: Vec<&'static str>,
    pub work: Work<'a>,
}

/// Runs `jobs` on `cores` cores, at most `at_once` of them at a time.
pub fn run(jobs: &[Job<'_>], at_once: usize, cores: usize) -> Result<()> {
    for (i, job) in jobs.iter().enumerate() {
        for need in &job.needs {
            if !jobs[..i].iter().any(|j| j.name == *need) {
                bail!("job {}: needs {need:?}, which no earlier job is", job.name);
            }
        }
    }
    let at_once = at_once.max(1);
    let started_at = Instant::now();
    let minutes = || started_at.elapsed().as_secs_f64() / 60.0;
    let mut ended: HashSet<&str> = HashSet::new();
    let mut started = vec![false; jobs.len()];
    let mut running = 0;
    let mut failure: Option<anyhow::Error> = None;
    let (done_tx, done_rx) = mpsc::channel::<(usize, Result<()>)>();
    std::thread::scope(|scope| {
        // While jobs share the cores, each of their matmuls keeps to its share.
        let mut sharing: Option<(usize, MatmulThreads)> = None;
        loop {
            if failure.is_none() {
                let ready: Vec<usize> = (0..jobs.len())
                    .filter(|&i| !started[i] && jobs[i].needs.iter().all(|n| ended.contains(n)))
                    .take(at_once - running)
                    .collect();
                let threads = (cores / (running + ready.len()).max(1)).max(1);
                for i in ready {
                    started[i] = true;
                    running += 1;
                    let (job, done_tx) = (&jobs[i], done_tx.clone());
                    super::progress::println(&format!(
                        "all: {} starts at {:.1} min on {threads} thread(s)",
                        job.name,
                        minutes()
                    ));
                    scope.spawn(move || {
                        let result = catch_unwind(AssertUnwindSafe(|| (job.work)(threads)))
                            .unwrap_or_else(|_| Err(anyhow!("it panicked")));
                        let _ = done_tx.send((i, result));
                    });
                }
            }
            let share = (running > 1).then(|| (cores / running).max(1));
            if sharing.as_ref().map(|(n, _)| *n) != share {
                sharing = share.map(|n| (n, MatmulThreads::limit(n)));
            }
            if running == 0 {
                break;
            }
            let Ok((i, result)) = done_rx.recv() else {
                break;
            };
            running -= 1;
            match result {
                Ok(()) => {
                    ended.insert(jobs[i].name);
                    super::progress::println(&format!(
                        "all: {} ended at {:.1} min",
                        jobs[i].name,
                        minutes()
                    ));
                }
                Err(e) => {
                    failure.get_or_insert(e.context(format!("stage {}", jobs[i].name)));
                }
            }
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Jobs that log when they start and end, sleeping in between.
    fn logged<'a>(
        log: &'a Mutex<Vec<String>>,
        spec: &[(&'static str, Vec<&'static str>, bool)],
    ) -> Vec<Job<'a>> {
        spec.iter()
            .map(|(name, needs, fails)| {
                let (name, fails) = (*name, *fails);
                Job {
                    name,
                    needs: needs.clone(),
                    work: Box::new(move |threads| {
                        log.lock().unwrap().push(format!("start {name} {threads}"));
                        std::thread::sleep(Duration::from_millis(30));
                        log.lock().unwrap().push(format!("end {name}"));
                        if fails {
                            bail!("{name} failed");
                        }
                        Ok(())
                    }),
                }
            })
            .collect()
    }

    fn position(log: &[String], line: &str) -> usize {
        (log.iter().position(|l| l == line)).unwrap_or_else(|| panic!("{line:?} not in {log:?}"))
    }

    #[test]
    fn jobs_start_after_their_needs_and_independent_ones_overlap() {
        let log = Mutex::new(Vec::new());
        let jobs = logged(
            &log,
            &[
                ("a", vec![], false),
                ("b", vec!["a"], false),
                ("c", vec!["a"], false),
                ("d", vec!["b", "c"], false),
            ],
        );
        run(&jobs, 2, 2).unwrap();
        drop(jobs);
        let log = log.into_inner().unwrap();
        assert_eq!(log.len(), 8, "{log:?}");
        assert!(position(&log, "end a") < position(&log, "start b 1"));
        assert!(position(&log, "end a") < position(&log, "start c 1"));
        // b and c ran side by side, one thread each.
        assert!(position(&log, "start c 1") < position(&log, "end b"));
        assert!(position(&log, "end b") < position(&log, "start d 2"));
        assert!(position(&log, "end c") < position(&log, "start d 2"));
    }

    #[test]
    fn one_at_a_time_runs_in_order() {
        let log = Mutex::new(Vec::new());
        let jobs = logged(&log, &[("a", vec![], false), ("b", vec![], false)]);
        run(&jobs, 1, 2).unwrap();
        drop(jobs);
        let log = log.into_inner().unwrap();
        assert_eq!(log, ["start a 2", "end a", "start b 2", "end b"]);
    }

    #[test]
    fn after_a_failure_nothing_starts_and_the_error_names_the_job() {
        let log = Mutex::new(Vec::new());
        let jobs = logged(
            &log,
            &[
                ("a", vec![], true),
                ("b", vec!["a"], false),
                ("c", vec![], false),
            ],
        );
        let err = run(&jobs, 1, 1).unwrap_err();
        assert!(format!("{err:#}").contains("stage a: a failed"), "{err:#}");
        drop(jobs);
        let log = log.into_inner().unwrap();
        assert_eq!(log, ["start a 1", "end a"]);
    }

    #[test]
    fn a_panicking_job_is_an_error_not_a_hang() {
        let jobs = [Job {
            name: "boom",
            needs: vec![],
            work: Box::new(|_| panic!("boom")),
        }];
        let err = run(&jobs, 2, 2).unwrap_err();
        assert!(
            format!("{err:#}").contains("stage boom: it panicked"),
            "{err:#}"
        );
    }

    #[test]
    fn a_need_that_is_no_earlier_job_is_refused() {
        let jobs = [Job {
            name: "a",
            needs: vec!["z"],
            work: Box::new(|_| Ok(())),
        }];
        let err = run(&jobs, 2, 2).unwrap_err();
        assert!(format!("{err:#}").contains("needs \"z\""), "{err:#}");
    }
}
