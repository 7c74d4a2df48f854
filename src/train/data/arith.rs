//! Integer expressions shared by the arithmetic and code domains: the AST,
//! evaluation, printing that reads back as the same tree, and the random
//! expressions the generators ask about.
//!
//! Generated expressions: 2 or 3 operands of at most two digits, one or two
//! of + - *, every product has a one-digit factor, no intermediate value is
//! negative and the value is at most [`MAX_VALUE`] (small enough for a tiny
//! model to learn exactly).

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use rand::Rng;

/// Largest value of a generated expression.
pub const MAX_VALUE: i64 = 999;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Add,
    Sub,
    Mul,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Add, Op::Sub, Op::Mul];

    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }

    fn precedence(self) -> u8 {
        match self {
            Op::Add | Op::Sub => 1,
            Op::Mul => 2,
        }
    }

    pub fn apply(self, a: i64, b: i64) -> Option<i64> {
        match self {
            Op::Add => a.checked_add(b),
            Op::Sub => a.checked_sub(b),
            Op::Mul => a.checked_mul(b),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    Num(i64),
    Var(String),
    Neg(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn bin(op: Op, a: Expr, b: Expr) -> Expr {
        Expr::Bin(op, Box::new(a), Box::new(b))
    }

    /// Evaluates with variables from `env`; overflow and unknown names are errors.
    pub fn eval(&self, env: &HashMap<String, i64>) -> Result<i64> {
        match self {
            Expr::Num(n) => Ok(*n),
            Expr::Var(name) => env
                .get(name)
                .copied()
                .ok_or_else(|| anyhow!("variable `{name}` is used before `let {name} = ...`")),
            Expr::Neg(e) => e
                .eval(env)?
                .checked_neg()
                .ok_or_else(|| anyhow!("integer overflow in negation")),
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval(env)?, b.eval(env)?);
                op.apply(a, b)
                    .ok_or_else(|| anyhow!("integer overflow in {a} {} {b}", op.symbol()))
            }
        }
    }

    /// Value of an expression without variables.
    pub fn value(&self) -> Result<i64> {
        self.eval(&HashMap::new())
    }

    /// "(12+7)*3" — no spaces (the arithmetic prompts).
    pub fn compact(&self) -> String {
        self.print(false)
    }

    /// "(a + b) * c" — spaces around operators (the code language).
    pub fn spaced(&self) -> String {
        self.print(true)
    }

    fn print(&self, spaced: bool) -> String {
        match self {
            Expr::Num(n) => n.to_string(),
            Expr::Var(v) => v.clone(),
            Expr::Neg(e) => match **e {
                Expr::Bin(..) => format!("-({})", e.print(spaced)),
                _ => format!("-{}", e.print(spaced)),
            },
            Expr::Bin(op, a, b) => {
                let wrap = |e: &Expr, right: bool| {
                    let text = e.print(spaced);
                    match e {
                        // Parentheses wherever reading left to right would
                        // build another tree: a lower-precedence child, or
                        // a right child of the same precedence ("a-(b+c)",
                        // and "a+(b+c)" too, though its value is a+b+c's:
                        // printed bare, two trees shared one prompt and
                        // their worked answers began with different sums,
                        // and the session-15 model got 19% of "a+b+c"
                        // prompts right against 90% of the rest).
                        Expr::Bin(child, ..)
                            if child.precedence() < op.precedence()
                                || (right && child.precedence() == op.precedence()) =>
                        {
                            format!("({text})")
                        }
                        _ => text,
                    }
                };
                let sep = if spaced {
                    format!(" {} ", op.symbol())
                } else {
                    op.symbol().to_string()
                };
                format!("{}{sep}{}", wrap(a, false), wrap(b, true))
            }
        }
    }

    /// The worked answer: every operation on two numbers, innermost first,
    /// worked in digit columns from the units up ([`columns`]):
    /// "12+7 then *3: 2+7=9, 1+0=1 so 19. 19*3: 9*3=27, 1*3+2=3+2=5 so 57";
    /// the last number is the value. Each step a tiny decoder takes is one
    /// single-digit fact plus a carry, the digits it needs sit next to it,
    /// and no digit depends on digits not yet written (written
    /// most-significant first, "68+34=102" needs the carry before the "1").
    ///
    /// The first step names what the second does to its result ("then
    /// *3", "then 12+"): copied while the model reads the expression in
    /// order, so that the second step copies it from the answer instead of
    /// finding the outer operator in the prompt, which the session-5 model
    /// often got wrong ("(75+23)-33" went on with "98*3"). Two-operation
    /// exact match went from 53% to 63% with it (README, "Quality").
    pub fn worked(&self) -> Result<String> {
        Ok(self.worked_with_chaining()?.0)
    }

    /// [`Expr::worked`] with the byte ranges that chain one step to the
    /// next: " then *3" in the first step's head and ". 19*3: " before the
    /// second step. What is left (the heads' first operands, the digit
    /// columns) is the one-step skill; one-operation answers have no range.
    pub fn worked_with_chaining(&self) -> Result<(String, Vec<Range<usize>>)> {
        let mut steps = Vec::new();
        let value = self.work(&mut steps)?;
        if steps.is_empty() {
            return Ok((value.to_string(), Vec::new()));
        }
        let mut text = String::new();
        let mut chaining = Vec::new();
        for (i, (head, work)) in steps.iter().enumerate() {
            if i == 0 {
                text.push_str(head);
                if let Some(rest) = self.outer_rest() {
                    let start = text.len();
                    text.push_str(&format!(" then {rest}"));
                    chaining.push(start..text.len());
                }
                text.push_str(": ");
            } else {
                let start = text.len();
                text.push_str(&format!(". {head}: "));
                chaining.push(start..text.len());
            }
            text.push_str(work);
        }
        Ok((text, chaining))
    }

    /// What the outermost operation does to a nested result: "*3" for
    /// `(12+7)*3`, "12+" for `12+7*3`; `None` unless exactly one side is
    /// a number and the other an operation.
    fn outer_rest(&self) -> Option<String> {
        let Expr::Bin(op, a, b) = self else {
            return None;
        };
        match (&**a, &**b) {
            (Expr::Bin(..), Expr::Num(n)) => Some(format!("{}{n}", op.symbol())),
            (Expr::Num(n), Expr::Bin(..)) => Some(format!("{n}{}", op.symbol())),
            _ => None,
        }
    }

    /// Pushes each operation's step, innermost first, as ("12+7", "2+7=9,
    /// 1+0=1 so 19"), and returns the value.
    fn work(&self, steps: &mut Vec<(String, String)>) -> Result<i64> {
        match self {
            Expr::Bin(op, a, b) => {
                let (x, y) = (a.work(steps)?, b.work(steps)?);
                let value = op
                    .apply(x, y)
                    .ok_or_else(|| anyhow!("integer overflow in {x} {} {y}", op.symbol()))?;
                steps.push((
                    format!("{x}{}{y}", op.symbol()),
                    format!("{} so {value}", columns(*op, x, y)?),
                ));
                Ok(value)
            }
            other => other.value(),
        }
    }

    /// The literals, left to right.
    pub fn literals(&self) -> Vec<i64> {
        match self {
            Expr::Num(n) => vec![*n],
            Expr::Var(_) => vec![],
            Expr::Neg(e) => e.literals(),
            Expr::Bin(_, a, b) => {
                let mut out = a.literals();
                out.extend(b.literals());
                out
            }
        }
    }

    /// The same expression with each literal replaced by `names[i]`, in order.
    pub fn with_names(&self, names: &[String]) -> Result<Expr> {
        let mut next = 0;
        let out = self.rename(names, &mut next)?;
        if next != names.len() {
            bail!("{} names for {next} literals", names.len());
        }
        Ok(out)
    }

    fn rename(&self, names: &[String], next: &mut usize) -> Result<Expr> {
        Ok(match self {
            Expr::Num(_) => {
                let name = names
                    .get(*next)
                    .ok_or_else(|| anyhow!("more literals than names"))?;
                *next += 1;
                Expr::Var(name.clone())
            }
            Expr::Var(v) => Expr::Var(v.clone()),
            Expr::Neg(e) => Expr::Neg(Box::new(e.rename(names, next)?)),
            Expr::Bin(op, a, b) => Expr::bin(*op, a.rename(names, next)?, b.rename(names, next)?),
        })
    }
}

/// The digit columns of `x op y`, units first, as "8+4=12, 6+3+1=10".
/// Sums carry into the next column ("+1"); differences borrow, shown as the
/// borrowing column's top digit plus ten and the next top digit less one
/// ("71-49": "11-9=2, 6-4=2"); products have one one-digit factor `k` and
/// carry whole tens, the product written before the carry is added
/// ("19*3": "9*3=27, 1*3+2=3+2=5"; in one step, "2*8+6=22", session 16's model
/// got the sum wrong in 34 of its 48 arithmetic misses on 400 prompts, the
/// product almost never). A shorter operand's
/// missing digits are written as 0 so that every column has one shape.
pub fn columns(op: Op, x: i64, y: i64) -> Result<String> {
    let digits = |n: i64| -> Vec<i64> {
        n.to_string()
            .bytes()
            .rev()
            .map(|b| i64::from(b - b'0'))
            .collect()
    };
    if x < 0 || y < 0 {
        bail!("worked columns need non-negative operands, got {x} and {y}");
    }
    let mut cols = Vec::new();
    match op {
        Op::Add | Op::Sub => {
            if op == Op::Sub && x < y {
                bail!("worked columns need {x}-{y} to be non-negative");
            }
            let (a, b) = (digits(x), digits(y));
            let mut carry = 0;
            for i in 0..a.len().max(b.len()) {
                let (top, bottom) = (
                    a.get(i).copied().unwrap_or(0),
                    b.get(i).copied().unwrap_or(0),
                );
                cols.push(if op == Op::Add {
                    let sum = top + bottom + carry;
                    let text = match carry {
                        0 => format!("{top}+{bottom}={sum}"),
                        _ => format!("{top}+{bottom}+{carry}={sum}"),
                    };
                    carry = sum / 10;
                    text
                } else {
                    let mut top = top - carry;
                    carry = i64::from(top < bottom);
                    top += 10 * carry;
                    format!("{top}-{bottom}={}", top - bottom)
                });
            }
        }
        Op::Mul => {
            let (n, k) = if y <= 9 {
                (x, y)
            } else if x <= 9 {
                (y, x)
            } else {
                bail!("worked columns need a one-digit factor in {x}*{y}");
            };
            let mut carry = 0;
            for d in digits(n) {
                let product = d * k + carry;
                cols.push(match carry {
                    0 => format!("{d}*{k}={product}"),
                    _ => format!("{d}*{k}+{carry}={}+{carry}={product}", d * k),
                });
                carry = product / 10;
            }
        }
    }
    Ok(cols.join(", "))
}

/// A random expression as described in the module doc.
pub fn random_expr<R: Rng + ?Sized>(rng: &mut R) -> Expr {
    loop {
        let op1 = Op::ALL[rng.random_range(0..3)];
        let expr = if rng.random_bool(0.4) {
            let (a, b) = (operand(rng), operand(rng));
            product_safe(rng, op1, a, b)
        } else {
            let op2 = Op::ALL[rng.random_range(0..3)];
            let (a, b, c) = (operand(rng), operand(rng), operand(rng));
            if rng.random_bool(0.5) {
                // (a op1 b) op2 c
                let inner = product_safe(rng, op1, a, b);
                product_safe(rng, op2, inner, c)
            } else {
                // a op1 (b op2 c)
                let inner = product_safe(rng, op2, b, c);
                product_safe(rng, op1, a, inner)
            }
        };
        if acceptable(&expr) {
            return expr;
        }
    }
}

fn operand<R: Rng + ?Sized>(rng: &mut R) -> Expr {
    Expr::Num(rng.random_range(0..=99))
}

/// `a op b`, where for a product one literal side is redrawn as one digit.
fn product_safe<R: Rng + ?Sized>(rng: &mut R, op: Op, a: Expr, b: Expr) -> Expr {
    if op != Op::Mul {
        return Expr::bin(op, a, b);
    }
    let digit = Expr::Num(rng.random_range(2..=9));
    match (&a, &b) {
        (Expr::Num(_), Expr::Num(_)) if rng.random_bool(0.5) => Expr::bin(op, digit, b),
        (_, Expr::Num(_)) => Expr::bin(op, a, digit),
        _ => Expr::bin(op, digit, b),
    }
}

/// No negative intermediate value, value within range, products have a
/// one-digit factor.
fn acceptable(expr: &Expr) -> bool {
    fn walk(e: &Expr) -> Option<i64> {
        match e {
            Expr::Num(n) => Some(*n),
            Expr::Bin(op, a, b) => {
                let (x, y) = (walk(a)?, walk(b)?);
                if *op == Op::Mul && x > 9 && y > 9 {
                    return None;
                }
                op.apply(x, y).filter(|v| (0..=MAX_VALUE).contains(v))
            }
            Expr::Var(_) | Expr::Neg(_) => None,
        }
    }
    walk(expr).is_some()
}

#[cfg(test)]
#[path = "arith_tests.rs"]
mod tests;
