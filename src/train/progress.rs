//! The training stages' progress bars. `train all` may run stages at once,
//! so every bar draws through one `MultiProgress`; when stderr is not a
//! terminal the bars are hidden and the stages print a line per window.

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// A bar named after its stage, at `done` of `steps`.
pub fn bar(stage: &str, steps: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed} elapsed, eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(stage.to_string());
    bar.set_position(done);
    bars().add(bar)
}

/// A line on stderr that does not tear the bars.
pub fn println(line: &str) {
    let bars = bars();
    if bars.is_hidden() {
        eprintln!("{line}");
    } else {
        let _ = bars.println(line);
    }
}
