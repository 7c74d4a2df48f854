//! The evaluation's results as data ([`EvalReport`], serialisable) and as
//! markdown tables: the targets with the measured numbers
//! (`targets.rs`), one table of mode-independent checks, one of adapters
//! against base, one per routing mode.
//!
//! Invariant: every mode table has the same rows in the same order; a row
//! that cannot be measured in a mode (the gate in `base`, pictures without a
//! VQ model) says `n/a` rather than disappearing.

use std::fmt::Write as _;

use serde::Serialize;

use super::image_checks::VqCheck;
use super::targets::targets;
use super::tasks::{mixed_kind_name, TaskScores};
use super::teacher::{AdapterVsBase, GateTally};
use crate::routing::mode::RoutingMode;
use crate::train::data::checker::AttributeTally;
use crate::train::data::shapes::Relation;
use crate::train::data::text_domains::MixedKind;
use crate::train::data::Domain;

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: RoutingMode,
    pub tasks: TaskScores,
    pub gate: Option<GateTally>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model_dir: String,
    /// Bytes of every file under the model directory.
    pub model_bytes: u64,
    /// Items per generation row (half as many per teacher-forced task).
    pub n: usize,
    pub seed: u64,
    pub image_temperature: f32,
    pub cfg_scale: f32,
    pub checker_ground_truth: AttributeTally,
    pub vq: Option<VqCheck>,
    pub adapters: Vec<AdapterVsBase>,
    pub modes: Vec<ModeResult>,
    pub wall_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Unit {
    Percent,
    Count,
    Seconds,
    PerSecond,
}

/// One line of a table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub metric: String,
    pub value: Option<f64>,
    /// Items the value is measured over (0: not applicable).
    pub n: usize,
    pub unit: Unit,
    pub target: &'static str,
}

impl Row {
    fn rate(metric: impl Into<String>, hits: usize, n: usize, target: &'static str) -> Self {
        Row {
            metric: metric.into(),
            value: (n > 0).then(|| hits as f64 / n as f64),
            n,
            unit: Unit::Percent,
            target,
        }
    }

    fn number(metric: &str, value: f64, unit: Unit) -> Self {
        Row {
            metric: metric.into(),
            value: Some(value),
            n: 0,
            unit,
            target: "",
        }
    }

    pub fn shown(&self) -> String {
        match (self.value, self.unit) {
            (None, _) => "n/a".into(),
            (Some(v), Unit::Percent) => format!("{:.1}%", 100.0 * v),
            (Some(v), Unit::Count) => format!("{v:.0}"),
            (Some(v), Unit::Seconds) => format!("{v:.1} s"),
            (Some(v), Unit::PerSecond) => format!("{v:.0}/s"),
        }
    }
}

/// The attribute rows of a tally: (attribute, target) pairs in order.
fn attribute_rows(
    prefix: &str,
    tally: &AttributeTally,
    attributes: &[(&str, &'static str)],
) -> Vec<Row> {
    let counts = [
        ("colour", tally.colour),
        ("shape", tally.shape),
        ("size", tally.size),
        ("position", tally.position),
        ("count", tally.count),
        ("background", tally.background),
        ("all", tally.all),
    ];
    attributes
        .iter()
        .map(|&(name, target)| {
            let hits = counts.iter().find(|c| c.0 == name).map_or(0, |c| c.1);
            Row::rate(format!("{prefix} {name}"), hits, tally.checked, target)
        })
        .collect()
}

const ALL_ATTRIBUTES: [&str; 7] = [
    "colour",
    "shape",
    "size",
    "position",
    "count",
    "background",
    "all",
];

/// The rows of one routing mode, always the same list.
pub fn mode_rows(m: &ModeResult) -> Vec<Row> {
    let t = &m.tasks;
    let exact = |task: &str| t.exact.get(task).copied().unwrap_or((0, 0));
    let draw_targets = |a: &str| match a {
        "colour" => "≥ 95% (single_pass)",
        "shape" | "position" => "≥ 85% (single_pass)",
        _ => "",
    };
    let draw: Vec<(&str, &'static str)> = ALL_ATTRIBUTES
        .iter()
        .map(|&a| (a, draw_targets(a)))
        .collect();
    let mut rows = attribute_rows("image (drawn from held-out captions):", &t.draw, &draw);
    for (shapes, label) in [
        (1, "image colour: one shape asked for"),
        (2, "image colour: two shapes asked for"),
    ] {
        let (h, n) = t
            .draw_colour_by_count
            .get(&shapes)
            .copied()
            .unwrap_or((0, 0));
        rows.push(Row::rate(label, h, n, ""));
    }
    for &relation in Relation::ALL {
        let label = match relation {
            Relation::LeftOf => "image colour: two shapes side by side",
            Relation::Above => "image colour: two shapes one above the other",
        };
        let by_relation = t.draw_colour_by_relation.get(relation.name());
        let (h, n) = by_relation.copied().unwrap_or((0, 0));
        rows.push(Row::rate(label, h, n, ""));
    }
    let unseen: Vec<(&str, &'static str)> = ["colour", "shape", "position", "count", "all"]
        .iter()
        .map(|&a| (a, ""))
        .collect();
    rows.extend(attribute_rows(
        "image (unseen colour-shape pairs):",
        &t.draw_unseen,
        &unseen,
    ));
    let (h, n) = exact("arithmetic");
    rows.push(Row::rate(
        "arithmetic exact match",
        h,
        n,
        "≥ 90% (single_pass)",
    ));
    for (ops, label) in [
        (1, "arithmetic: one operation"),
        (2, "arithmetic: two operations"),
    ] {
        let (h, n) = t.arithmetic_by_ops.get(&ops).copied().unwrap_or((0, 0));
        rows.push(Row::rate(label, h, n, ""));
    }
    let (h, n) = exact("code");
    rows.push(Row::rate(
        "code exact match (program output)",
        h,
        n,
        "≥ 85% (single_pass)",
    ));
    let (h, n) = exact("caption");
    rows.push(Row::rate(
        "captioning exact match (all attributes)",
        h,
        n,
        "≥ 90% (single_pass)",
    ));
    let caption: Vec<(&str, &'static str)> = ["colour", "shape", "size", "position", "count"]
        .iter()
        .map(|&a| (a, ""))
        .collect();
    rows.extend(attribute_rows("captioning:", &t.caption, &caption));
    let (h, n) = exact("mixed");
    rows.push(Row::rate(
        "mixed requests exact match",
        h,
        n,
        "single_pass ≥ per_sequence + 20 points",
    ));
    for kind in MixedKind::ALL {
        let (h, n) = t
            .mixed
            .get(mixed_kind_name(kind))
            .copied()
            .unwrap_or((0, 0));
        rows.push(Row::rate(
            format!("mixed: {}", mixed_kind_name(kind)),
            h,
            n,
            "",
        ));
        let prefix = format!("{}: ", mixed_kind_name(kind));
        for (key, &(h, n)) in &t.mixed_parts {
            if let Some(domain) = key.strip_prefix(&prefix) {
                let label = format!("mixed: {}, {domain} part right", mixed_kind_name(kind));
                rows.push(Row::rate(label, h, n, ""));
            }
        }
    }
    let gate = m.gate.clone().unwrap_or_default();
    rows.push(Row::rate(
        "gate routing accuracy (top-1, last layer)",
        gate.correct,
        gate.total,
        "≥ 90% (single_pass)",
    ));
    for d in [Domain::Arithmetic, Domain::Code, Domain::Caption] {
        let (h, n) = gate.by_domain.get(&d).copied().unwrap_or((0, 0));
        rows.push(Row::rate(
            format!("gate accuracy: {} tokens", d.name()),
            h,
            n,
            "",
        ));
    }
    let (h, n) = gate.skill;
    rows.push(Row::rate("gate accuracy: chaining tokens", h, n, ""));
    let (h, n) = gate.mixed;
    rows.push(Row::rate("gate accuracy: mixed-request tokens", h, n, ""));
    rows.push(Row::number("failed requests", t.failed as f64, Unit::Count));
    rows.push(Row::number(
        "generated tokens",
        t.generated_tokens as f64,
        Unit::Count,
    ));
    rows.push(Row::number("generation wall time", t.wall_s, Unit::Seconds));
    rows.push(Row::number(
        "generated tokens per second",
        t.generated_tokens as f64 / t.wall_s.max(1e-9),
        Unit::PerSecond,
    ));
    rows
}

/// Rows that do not depend on the routing mode.
pub fn pipeline_rows(r: &EvalReport) -> Vec<Row> {
    let gt: Vec<(&str, &'static str)> = ALL_ATTRIBUTES.iter().map(|&a| (a, "≥ 99%")).collect();
    let mut rows = attribute_rows(
        "checker on ground-truth renderings:",
        &r.checker_ground_truth,
        &gt,
    );
    let plain: Vec<(&str, &'static str)> = ALL_ATTRIBUTES.iter().map(|&a| (a, "")).collect();
    let vq = r.vq.clone().unwrap_or_default();
    rows.extend(attribute_rows(
        "checker on VQ reconstructions:",
        &vq.checker,
        &plain,
    ));
    rows.push(Row {
        metric: "VQ reconstruction PSNR (dB)".into(),
        value: r.vq.as_ref().map(|v| v.psnr_db),
        n: vq.images,
        unit: Unit::Count,
        target: "",
    });
    rows.push(Row {
        metric: "model directory size (MB)".into(),
        value: Some(r.model_bytes as f64 / 1e6),
        n: 0,
        unit: Unit::Count,
        target: "≤ 60 MB",
    });
    rows
}

fn table(out: &mut String, rows: &[Row]) {
    out.push_str("| metric | value | n | target |\n| --- | ---: | ---: | --- |\n");
    for r in rows {
        let value = match (
            r.metric.contains("PSNR") || r.metric.contains("MB"),
            r.value,
        ) {
            (true, Some(v)) => format!("{v:.1}"),
            _ => r.shown(),
        };
        let n = if r.n > 0 {
            r.n.to_string()
        } else {
            String::new()
        };
        let _ = writeln!(out, "| {} | {value} | {n} | {} |", r.metric, r.target);
    }
}

/// Pairs shown in a mode's colour-miss line.
const SHOWN_MISSES: usize = 5;

/// The one-shape drawings most often drawn in another colour, as one line;
/// `None` when every colour was right.
fn colour_misses(t: &TaskScores) -> Option<String> {
    let mut misses: Vec<(usize, String)> = (t.draw_pairs.iter())
        .flat_map(|(pair, p)| {
            (p.drawn_instead.iter())
                .map(move |(colour, &k)| (k, format!("{pair} → {colour} {k}/{}", p.asked)))
        })
        .collect();
    if misses.is_empty() {
        return None;
    }
    misses.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let shown: Vec<String> = misses.into_iter().take(SHOWN_MISSES).map(|m| m.1).collect();
    Some(format!(
        "Colours most often drawn instead, one shape asked for (asked → drawn: times / asked): {}.",
        shown.join("; ")
    ))
}

/// Every table, in markdown.
pub fn markdown(r: &EvalReport) -> String {
    let mut out = String::new();
    out.push_str("### Targets\n\n| target | measured | met |\n| --- | --- | --- |\n");
    for t in targets(r) {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(out, "| {} | {} | {met} |", t.target, t.measured);
    }
    out.push_str("\n### Image pipeline (all modes)\n\n");
    table(&mut out, &pipeline_rows(r));
    out.push_str(
        "\n### Each adapter against base on its own domain\n\n\
         Mean next-token loss (nats) over held-out answer tokens of the adapter's \
         domains, with the adapter off and on where it is served: a modality \
         adapter on the rows of its modality, over the base; a semantic adapter \
         as the gate's only expert (every text row), over the base with the \
         modality adapters it was trained on top of. Tokens the model's recipe \
         (`recipe.json`: `adapter_only_domains`, `adapter_only_skills`) left to \
         another adapter are not counted for one that never learned them.\n\n\
         | adapter | domains | off = | tokens | loss off | loss on | ppl off | ppl on | better on |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for a in &r.adapters {
        let domains: Vec<&str> = a.domains.iter().map(|d| d.name()).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.4} | {:.4} | {:.3} | {:.3} | {} |",
            a.adapter,
            domains.join(", "),
            a.baseline,
            a.tokens,
            a.base_loss,
            a.adapter_loss,
            a.base_loss.exp(),
            a.adapter_loss.exp(),
            if a.beats_base() { "yes" } else { "**no**" }
        );
    }
    for m in &r.modes {
        let _ = write!(out, "\n### Routing mode `{}`\n\n", m.mode);
        table(&mut out, &mode_rows(m));
        if let Some(line) = colour_misses(&m.tasks) {
            let _ = writeln!(out, "\n{line}");
        }
        if let Some(e) = &m.tasks.first_failure {
            let _ = writeln!(out, "\nFirst failed request: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::tasks::PairColours;

    #[test]
    fn colour_misses_list_the_most_frequent_first() {
        let mut t = TaskScores::default();
        assert_eq!(colour_misses(&t), None);
        let pair = |asked, instead: &[(&str, usize)]| PairColours {
            asked,
            drawn_instead: instead.iter().map(|&(c, k)| (c.to_string(), k)).collect(),
        };
        t.draw_pairs
            .insert("green square".into(), pair(5, &[("yellow", 5)]));
        t.draw_pairs.insert(
            "blue triangle".into(),
            pair(18, &[("green", 9), ("purple", 1)]),
        );
        t.draw_pairs.insert("red circle".into(), pair(30, &[]));
        let line = colour_misses(&t).unwrap();
        assert!(
            line.ends_with(": blue triangle → green 9/18; green square → yellow 5/5; blue triangle → purple 1/18."),
            "{line}"
        );
    }
}
