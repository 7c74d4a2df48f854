#!/usr/bin/env python3
"""Quick sanity check of a served demo model (not the evaluation: see EVAL.md).

Asks a running `molora serve` for greedy answers to held-out arithmetic
prompts (expressions whose content key falls in the test bucket, the same
FNV-1a + splitmix64 hash as src/train/data/mod.rs), a few code requests, a
drawing, and a caption of the drawing; prints what came back.

    ./target/release/molora serve &          # models/demo by default
    python3 scripts/demo_sanity.py [--url http://127.0.0.1:8080] [--n 20]
"""
import argparse
import json
import random
import urllib.request

MASK = (1 << 64) - 1


def in_test_bucket(key: str) -> bool:
    h = 0xCBF29CE484222325
    for b in key.encode():
        h ^= b
        h = (h * 0x100000001B3) & MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
    h ^= h >> 31
    return h % 10 == 0


def held_out_expressions(n: int, seed: int):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b, c, d = (rng.randint(0, 99) for _ in range(4))
        digit = rng.randint(2, 9)
        expr = rng.choice([f"{a}+{b}", f"{a}-{b}" if a >= b else f"{b}-{a}", f"{a}*{digit}",
                           f"({a}+{b})*{digit}", f"{a}+{b}-{c}", f"{a}+{c}+{d}"])
        value = eval(expr)
        if 0 <= value <= 999 and in_test_bucket(expr):
            out.append((expr, value))
    return out


def generate(url, prompt, max_tokens, mode=None):
    body = {"prompt": prompt, "max_tokens": max_tokens,
            "sampling": {"text": {"temperature": 0.0}, "image": {"temperature": 0.0}, "seed": 0}}
    if mode:
        body["routing_mode"] = mode
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def text_of(resp):
    return "".join(p.get("text", "") for p in resp["parts"] if p["type"] == "text").strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    for mode in ["single_pass", "base"]:
        hits = 0
        for expr, value in held_out_expressions(args.n, args.seed):
            got = text_of(generate(args.url, f"what is {expr}?", 8, mode))
            hits += got == str(value)
            print(f"[{mode}] what is {expr}? -> {got!r} (gold {value})")
        print(f"[{mode}] arithmetic exact match: {hits}/{args.n}\n")

    for expr, value in held_out_expressions(3, args.seed + 1):
        got = text_of(generate(args.url, f"write code that computes {expr}", 40))
        print(f"write code that computes {expr} -> {got!r} (value {value})")

    resp = generate(args.url, "draw a small red circle at the top left on a white background", 80)
    images = [p for p in resp["parts"] if p["type"] == "image"]
    print(f"\ndraw: {len(images)} image(s), text {text_of(resp)!r}")
    if images:
        with open("/tmp/demo_sanity_draw.png", "wb") as f:
            import base64
            f.write(base64.b64decode(images[0]["png_base64"]))
        print("  wrote /tmp/demo_sanity_draw.png")
        prompt = [{"type": "image", "png_base64": images[0]["png_base64"]},
                  {"type": "text", "text": "describe the image"}]
        print(f"caption of it: {text_of(generate(args.url, prompt, 30))!r}")


if __name__ == "__main__":
    main()
