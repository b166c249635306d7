"""CLI: ``esr-lab judge`` (score one response) and ``esr-lab prompts`` (prompt set upkeep)."""

from __future__ import annotations

import json
import sys

from esr_core.io import read_text_arg
from esr_core.judge.calibration import run_calibration
from esr_core.judge.prompts import ANSWERS_PATH, generate_default_answers, load_prompts
from esr_core.judge.scoring import get_judge, verdict


def cmd_judge(args) -> int:
    prompt = read_text_arg(args.prompt, "--prompt")
    response = read_text_arg(args.response, "--response")
    distractor = read_text_arg(args.distractor, "--distractor") if args.distractor else None
    judge = get_judge(args.judge)
    j = judge(prompt, response, distractor)
    v = verdict(j)
    if args.json:
        out = dict(j, verdict=v)
        if not args.features:
            out["attempts"] = [{k: a[k] for k in ("attempt_text", "score", "start_char", "end_char")}
                               for a in out["attempts"]]
        print(json.dumps(out, ensure_ascii=False, indent=1))
        return 0
    print(f"judge: {j['judge']}")
    if not j["attempts"]:
        print("no attempt (empty response): trial excluded")
    for i, a in enumerate(j["attempts"], 1):
        text = " ".join(a["attempt_text"].split())
        if len(text) > 160:
            text = text[:157] + "..."
        print(f"attempt {i}: score {a['score']:.1f}  [chars {a['start_char']}-{a['end_char']}]")
        print(f"  {text}")
    if j["restart_phrases"]:
        print("restart phrases: " + "; ".join(f"\"{p['text']}\" ({p['kind']}, char {p['start_char']})"
                                             for p in j["restart_phrases"]))
    else:
        print("restart phrases: none")
    print(f"verdict: {v}")
    return 0


def cmd_prompts_list(args) -> int:
    for p in load_prompts():
        print(f"{p['id']}\t{p['topic']}\t{p['prompt']}")
    return 0


def cmd_prompts_answer(args) -> int:
    path = args.out or ANSWERS_PATH
    recs = generate_default_answers(model=args.model, path=path, backend=args.backend,
                                    progress=lambda i, n: print(f"{i}/{n}", file=sys.stderr))
    print(f"wrote {len(recs)} answers to {path} ({recs[0]['settings']['generated_with']})")
    return 0


def cmd_prompts_calibrate(args) -> int:
    summary = run_calibration(write=not args.dry_run)
    print(json.dumps(summary, indent=1))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("judge", help="split a response into attempts and score them 0-100")
    p.add_argument("--prompt", required=True, help="the task prompt (text, @file or -)")
    p.add_argument("--response", required=True, help="the model's response (text, @file or -)")
    p.add_argument("--distractor", help="description of the steering distractor (text or @file)")
    p.add_argument("--judge", choices=["offline", "llm"], default="offline",
                   help="offline (local embeddings) or llm (ESR_JUDGE_* environment variables)")
    p.add_argument("--json", action="store_true", help="print the judgement as JSON")
    p.add_argument("--features", action="store_true", help="with --json: include the scoring features")
    p.set_defaults(func=cmd_judge)

    pp = subparsers.add_parser("prompts", help="the how-to prompt set and its unsteered answers")
    psub = pp.add_subparsers(dest="prompts_command", metavar="ACTION")
    pl = psub.add_parser("list", help="print the prompt set")
    pl.set_defaults(func=cmd_prompts_list)
    pa = psub.add_parser("answer", help="regenerate the default model's unsteered answers (greedy, 192 tokens)")
    pa.add_argument("--model", default="smollm2-135m-instruct")
    pa.add_argument("--backend", choices=["auto", "engine", "hf"], default="auto",
                    help="auto: the steering engine when it can start, else plain HF generate")
    pa.add_argument("--out", help="output .jsonl (default: the shipped assets/prompts/default_answers.jsonl)")
    pa.set_defaults(func=cmd_prompts_answer)
    pc = psub.add_parser("calibrate", help="re-score the judge calibration sets and rewrite assets/judge/")
    pc.add_argument("--dry-run", action="store_true", help="print the summary without writing files")
    pc.set_defaults(func=cmd_prompts_calibrate)
