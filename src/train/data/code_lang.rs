//! A tiny code language, its interpreter, and the canonical program the
//! code domain answers with.
//!
//! ```text
//! program := stmt (';' stmt)* ';'?
//! stmt    := 'let' name '=' expr | 'print' expr
//! expr    := term (('+' | '-') term)*
//! term    := factor ('*' factor)*
//! factor  := integer | name | '(' expr ')' | '-' factor
//! ```
//!
//! A program's output is the value of its one `print`; a program that does
//! not parse, uses an unbound name, overflows, or prints zero or several
//! times is an error. Input size and nesting are bounded so hostile input
//! cannot exhaust the stack.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};

use super::arith::{Expr, Op};

/// Longest program the interpreter accepts, in bytes.
pub const MAX_PROGRAM_LEN: usize = 10_000;
/// Deepest nesting of parentheses and unary minus.
const MAX_DEPTH: usize = 64;
/// Most binary operators in one program (evaluation recurses along them).
const MAX_OPERATORS: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Let,
    Print,
    Name(String),
    Int(i64),
    Op(Op),
    LParen,
    RParen,
    Assign,
    Semi,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    Let(String, Expr),
    Print(Expr),
}

/// Runs a program and returns the value it prints.
pub fn run(program: &str) -> Result<i64> {
    let stmts = parse(program)?;
    let mut env = HashMap::new();
    let mut printed = Vec::new();
    for stmt in &stmts {
        match stmt {
            Stmt::Let(name, e) => {
                let v = e.eval(&env)?;
                env.insert(name.clone(), v);
            }
            Stmt::Print(e) => printed.push(e.eval(&env)?),
        }
    }
    match printed.as_slice() {
        [v] => Ok(*v),
        [] => bail!("the program never prints"),
        many => bail!("the program prints {} times; expected once", many.len()),
    }
}

/// Parses a program into statements.
pub fn parse(program: &str) -> Result<Vec<Stmt>> {
    if program.len() > MAX_PROGRAM_LEN {
        bail!(
            "program is {} bytes; at most {MAX_PROGRAM_LEN}",
            program.len()
        );
    }
    let tokens = lex(program)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        operators: 0,
    };
    let mut stmts = Vec::new();
    while p.peek().is_some() {
        stmts.push(p.stmt()?);
        match p.next() {
            None | Some(Token::Semi) => {}
            Some(t) => bail!("expected `;` between statements, found {t:?}"),
        }
    }
    if stmts.is_empty() {
        bail!("empty program");
    }
    Ok(stmts)
}

/// The canonical program for an expression: one `let` per literal, named
/// a, b, c... in order, then `print` of the expression over those names:
/// 17*3 -> "let a = 17; let b = 3; print a * b".
pub fn program_for(expr: &Expr) -> Result<String> {
    let literals = expr.literals();
    if literals.len() > 26 {
        bail!(
            "{} literals; the canonical program names at most 26",
            literals.len()
        );
    }
    let names: Vec<String> = (0..literals.len())
        .map(|i| ((b'a' + i as u8) as char).to_string())
        .collect();
    let body = expr.with_names(&names)?;
    let mut out = String::new();
    for (name, value) in names.iter().zip(&literals) {
        out.push_str(&format!("let {name} = {value}; "));
    }
    out.push_str(&format!("print {}", body.spaced()));
    Ok(out)
}

fn lex(src: &str) -> Result<Vec<Token>> {
    let mut out = Vec::new();
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let single = match c {
            '+' => Some(Token::Op(Op::Add)),
            '-' => Some(Token::Op(Op::Sub)),
            '*' => Some(Token::Op(Op::Mul)),
            '(' => Some(Token::LParen),
            ')' => Some(Token::RParen),
            '=' => Some(Token::Assign),
            ';' => Some(Token::Semi),
            _ => None,
        };
        if let Some(t) = single {
            out.push(t);
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let n = text
                .parse::<i64>()
                .with_context(|| format!("integer literal {text} is too large"))?;
            out.push(Token::Int(n));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            out.push(match word.as_str() {
                "let" => Token::Let,
                "print" => Token::Print,
                _ => Token::Name(word),
            });
        } else {
            bail!("unexpected character {c:?} at offset {i}");
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    operators: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn count_operator(&mut self) -> Result<()> {
        self.operators += 1;
        if self.operators > MAX_OPERATORS {
            bail!("more than {MAX_OPERATORS} operators");
        }
        Ok(())
    }

    fn expect(&mut self, want: &Token, what: &str) -> Result<()> {
        match self.next() {
            Some(t) if &t == want => Ok(()),
            Some(t) => bail!("expected {what}, found {t:?}"),
            None => bail!("expected {what}, found the end of the program"),
        }
    }

    fn stmt(&mut self) -> Result<Stmt> {
        match self.next() {
            Some(Token::Let) => {
                let name = match self.next() {
                    Some(Token::Name(n)) => n,
                    other => bail!("expected a name after `let`, found {other:?}"),
                };
                self.expect(&Token::Assign, "`=`")?;
                Ok(Stmt::Let(name, self.expr(0)?))
            }
            Some(Token::Print) => Ok(Stmt::Print(self.expr(0)?)),
            other => bail!("expected `let` or `print`, found {other:?}"),
        }
    }

    fn expr(&mut self, depth: usize) -> Result<Expr> {
        let mut left = self.term(depth)?;
        while let Some(Token::Op(op @ (Op::Add | Op::Sub))) = self.peek().cloned() {
            self.pos += 1;
            self.count_operator()?;
            left = Expr::bin(op, left, self.term(depth)?);
        }
        Ok(left)
    }

    fn term(&mut self, depth: usize) -> Result<Expr> {
        let mut left = self.factor(depth)?;
        while let Some(Token::Op(Op::Mul)) = self.peek() {
            self.pos += 1;
            self.count_operator()?;
            left = Expr::bin(Op::Mul, left, self.factor(depth)?);
        }
        Ok(left)
    }

    fn factor(&mut self, depth: usize) -> Result<Expr> {
        if depth > MAX_DEPTH {
            bail!("expression nested deeper than {MAX_DEPTH}");
        }
        match self.next() {
            Some(Token::Int(n)) => Ok(Expr::Num(n)),
            Some(Token::Name(n)) => Ok(Expr::Var(n)),
            Some(Token::Op(Op::Sub)) => Ok(Expr::Neg(Box::new(self.factor(depth + 1)?))),
            Some(Token::LParen) => {
                let e = self.expr(depth + 1)?;
                self.expect(&Token::RParen, "`)`")?;
                Ok(e)
            }
            Some(t) => Err(anyhow!("expected a number, a name or `(`, found {t:?}")),
            None => bail!("expected an expression, found the end of the program"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::arith::random_expr;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn good_programs_print_their_value() {
        assert_eq!(run("let a = 17; let b = 3; print a * b").unwrap(), 51);
        assert_eq!(
            run("let a = 12; let b = 7; let c = 3; print (a + b) * c").unwrap(),
            57
        );
        assert_eq!(run("print 2 + 3 * 4;").unwrap(), 14);
        assert_eq!(run("let x = 5; let x = x * x; print -x + 1").unwrap(), -24);
        assert_eq!(run("print 10 - 4 - 3").unwrap(), 3);
        assert_eq!(
            run("let long_name1 = 4;print long_name1*(2-(1))").unwrap(),
            4
        );
    }

    #[test]
    fn bad_programs_are_errors() {
        for bad in [
            "",
            "print",
            "let a = 3",
            "print a",
            "let = 3; print 1",
            "let a 3; print a",
            "print (1 + 2",
            "print 1 + 2)",
            "print 1 print 2",
            "print 1; print 2",
            "print 3 / 4",
            "print 99999999999999999999",
            "let a = 9223372036854775807; print a + 1",
            "write code that computes 17*3",
        ] {
            assert!(run(bad).is_err(), "{bad:?} should fail");
        }
        let deep = format!("print {}1{}", "(".repeat(500), ")".repeat(500));
        assert!(run(&deep).is_err());
        assert!(run(&"print 1 + ".repeat(5000)).is_err());
        assert!(run(&format!("print 1{}", " + 1".repeat(2000))).is_err());
    }

    #[test]
    fn canonical_programs_compute_their_expression() {
        let e = Expr::bin(Op::Mul, Expr::Num(17), Expr::Num(3));
        assert_eq!(
            program_for(&e).unwrap(),
            "let a = 17; let b = 3; print a * b"
        );
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..500 {
            let e = random_expr(&mut rng);
            let program = program_for(&e).unwrap();
            assert_eq!(run(&program).unwrap(), e.value().unwrap(), "{program}");
        }
    }
}
