//! Tests of [`super`]: printing and reading back, worked answers, digit
//! columns and the generators' limits.

use super::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn printing_uses_only_needed_parentheses() {
    let n = Expr::Num;
    let e = Expr::bin(Op::Mul, Expr::bin(Op::Add, n(12), n(7)), n(3));
    assert_eq!(e.compact(), "(12+7)*3");
    assert_eq!(e.value().unwrap(), 57);
    let e = Expr::bin(Op::Sub, n(50), Expr::bin(Op::Sub, n(20), n(5)));
    assert_eq!(e.compact(), "50-(20-5)");
    assert_eq!(e.value().unwrap(), 35);
    let e = Expr::bin(Op::Add, Expr::bin(Op::Mul, n(4), n(5)), n(1));
    assert_eq!(e.spaced(), "4 * 5 + 1");
    let left = Expr::bin(Op::Add, Expr::bin(Op::Add, n(11), n(12)), n(91));
    let right = Expr::bin(Op::Add, n(11), Expr::bin(Op::Add, n(12), n(91)));
    assert_eq!(left.compact(), "11+12+91");
    assert_eq!(right.compact(), "11+(12+91)");
    let e = Expr::bin(Op::Mul, n(2), Expr::bin(Op::Mul, n(3), n(4)));
    assert_eq!(e.spaced(), "2 * (3 * 4)");
}

/// A prompt names one tree, so its worked answer is the only one the
/// model sees for it.
#[test]
fn printed_expressions_read_back_as_the_same_tree() {
    use crate::train::data::code_lang::{parse, Stmt};
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..2000 {
        let e = random_expr(&mut rng);
        for text in [e.compact(), e.spaced()] {
            let stmts = parse(&format!("print {text}")).unwrap();
            assert_eq!(stmts, vec![Stmt::Print(e.clone())], "{text}");
        }
    }
}

#[test]
fn worked_answers_go_innermost_first_and_end_in_the_value() {
    let n = Expr::Num;
    let e = Expr::bin(Op::Mul, Expr::bin(Op::Add, n(12), n(7)), n(3));
    assert_eq!(
        e.worked().unwrap(),
        "12+7 then *3: 2+7=9, 1+0=1 so 19. 19*3: 9*3=27, 1*3+2=3+2=5 so 57"
    );
    let e = Expr::bin(Op::Add, n(12), Expr::bin(Op::Mul, n(7), n(3)));
    assert_eq!(
        e.worked().unwrap(),
        "7*3 then 12+: 7*3=21 so 21. 12+21: 2+1=3, 1+2=3 so 33"
    );
    assert_eq!(n(5).worked().unwrap(), "5");
    let (text, chaining) = e.worked_with_chaining().unwrap();
    let chained: Vec<&str> = chaining.iter().map(|r| &text[r.clone()]).collect();
    assert_eq!(chained, [" then 12+", ". 12+21: "]);
    let one_step = Expr::bin(Op::Add, n(12), n(7)).worked_with_chaining();
    assert!(one_step.unwrap().1.is_empty());
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..500 {
        let e = random_expr(&mut rng);
        let worked = e.worked().unwrap();
        let last = worked.rsplit(' ').next().unwrap();
        assert_eq!(last.parse::<i64>().unwrap(), e.value().unwrap(), "{worked}");
    }
}

#[test]
fn columns_carry_and_borrow_from_the_units_up() {
    assert_eq!(columns(Op::Add, 68, 34).unwrap(), "8+4=12, 6+3+1=10");
    assert_eq!(columns(Op::Add, 19, 7).unwrap(), "9+7=16, 1+0+1=2");
    assert_eq!(columns(Op::Sub, 71, 49).unwrap(), "11-9=2, 6-4=2");
    assert_eq!(columns(Op::Sub, 100, 1).unwrap(), "10-1=9, 9-0=9, 0-0=0");
    assert_eq!(columns(Op::Mul, 3, 19).unwrap(), "9*3=27, 1*3+2=3+2=5");
    assert_eq!(columns(Op::Mul, 7, 3).unwrap(), "7*3=21");
    assert!(columns(Op::Sub, 3, 4).is_err());
    assert!(columns(Op::Mul, 12, 34).is_err());
    // Every column's digits recompose the value.
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..2000 {
        let e = random_expr(&mut rng);
        if let Expr::Bin(op, a, b) = &e {
            let (x, y) = (a.value().unwrap(), b.value().unwrap());
            let text = columns(*op, x, y).unwrap();
            let results: Vec<i64> = text
                .split(", ")
                .map(|c| c.rsplit('=').next().unwrap().parse().unwrap())
                .collect();
            let (last, rest) = results.split_last().unwrap();
            let mut value = *last;
            for r in rest.iter().rev() {
                value = value * 10 + r % 10;
            }
            assert_eq!(value, e.value().unwrap(), "{} -> {text}", e.compact());
        }
    }
}

#[test]
fn random_expressions_respect_the_limits() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut saw_parens = false;
    for _ in 0..2000 {
        let e = random_expr(&mut rng);
        let v = e.value().unwrap();
        assert!((0..=MAX_VALUE).contains(&v), "{} = {v}", e.compact());
        let lits = e.literals();
        assert!((2..=3).contains(&lits.len()));
        assert!(lits.iter().all(|l| (0..=99).contains(l)));
        saw_parens |= e.compact().contains('(');
    }
    assert!(saw_parens);
}
