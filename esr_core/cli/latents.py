"""CLI for the latent catalog: ``search``, ``latent``, ``fires`` and ``catalog build|import-neuronpedia|info``."""

from __future__ import annotations

import argparse
import json
import sys

from esr_core.cli.common import StderrProgress, dump_json, sae_spec
from esr_core.errors import BadInput
from esr_core.io import safe_name
from esr_core.latents.catalog.build import REFRESHABLE, build_catalog, catalog_for, default_corpus, refresh_catalog
from esr_core.latents.catalog.store import SHIPPED_DIR, Catalog, cached_catalog_dir, find_catalog
from esr_core.latents.neuronpedia import clear_import, import_neuronpedia
from esr_core.latents.search import latents_firing_on, search_latents, warm_search
from esr_core.models.loading import load_model
from esr_core.models.registry import DEFAULT_MODEL, get_entry
from esr_core.models.sae import load_sae
from esr_core.paths import repo_relative


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--sae", default=None, help="SAE folder or release:sae_id (default: the model's default SAE)")


def _catalog(args):
    """The catalog for --model/--sae; loads the model only if it has to be built."""
    sae = load_sae(sae_spec(args))
    p = find_catalog(args.model, sae)
    if p is not None:
        return Catalog.load(p)
    print("No catalog for this SAE yet: building one on a small local corpus (cached).", file=sys.stderr)
    return catalog_for(load_model(args.model), sae, progress=StderrProgress())


def cmd_search(args) -> int:
    cat = _catalog(args)
    res = search_latents(cat, args.query, top=args.top, min_density=args.min_density,
                         max_density=args.max_density, include_dead=args.include_dead)
    if args.json:
        dump_json([{k: r[k] for k in ("latent", "description", "score", "density", "max_act")} for r in res])
        return 0
    print(f"{len(res)} latents for {args.query!r} (descriptions: {cat.source})")
    for r in res:
        print(f"{r['latent']:>7}  {r['score']:6.3f}  {r['density']:8.4%}  {r['description']}")
    return 0


def _mark(ctx: dict) -> str:
    toks = list(ctx["tokens"])
    p = ctx["peak_index"]
    toks[p] = f"[[{toks[p]}]]"
    return "".join(toks).replace("\n", "⏎")


def cmd_latent(args) -> int:
    cat = _catalog(args)
    e = cat.entry(args.id)
    if args.json:
        dump_json(e)
        return 0
    print(f"latent {e['latent']}: {e['description']}  [{e['description_source']}]")
    print(f"density {e['density']:.4%}  max act {e['max_act']:.3f}  active on {e['n_active']:,} tokens"
          + ("  DEAD" if e["dead"] else ""))
    print("fires on:   " + ", ".join(repr(t["token"]) for t in e["top_tokens"][:10]))
    print("promotes:   " + ", ".join(repr(t["token"]) for t in e["promoted"]))
    print("suppresses: " + ", ".join(repr(t["token"]) for t in e["suppressed"]))
    print("neighbours: " + "; ".join(f"{n['latent']} ({n['cosine']:.2f})" for n in e["neighbours"]))
    for kind in ("text", "chat"):
        ctxs = e["contexts"][kind]
        if ctxs:
            print(f"top {kind} contexts:")
            for c in ctxs[:8]:
                print(f"  {c['max_act']:8.3f}  {_mark(c)}")
    return 0


def cmd_fires(args) -> int:
    cat = _catalog(args)
    model, sae = load_model(args.model), load_sae(sae_spec(args))
    res = latents_firing_on((model, sae), args.text, top=args.top, catalog=cat)
    if args.json:
        dump_json(res)
        return 0
    for r in res:
        print(f"{r['latent']:>7}  {r['relative']:6.2f}x  {r['max_act_on_text']:8.3f}  at {r['token']!r:>12}  {r['description']}")
    return 0


def cmd_build(args) -> int:
    if args.tokens <= 0:
        raise BadInput("--tokens must be positive")
    model = load_model(args.model)
    spec = sae_spec(args)
    sae = load_sae(spec)
    entry = get_entry(args.model)
    is_default = not args.sae or (entry is not None and entry.default_sae_path is not None
                                  and str(entry.default_sae_path) == str(spec))
    out = args.out or (SHIPPED_DIR / safe_name(model.name) if is_default else cached_catalog_dir(model.name, sae))
    texts, chats, note = default_corpus(model, args.tokens)
    chats = chats[: args.chats]
    print(f"building the catalog of {spec} over ~{args.tokens:,} tokens of held-out text and {len(chats)} chat "
          f"answers into {out}", file=sys.stderr)
    cmd = "esr-lab " + " ".join(sys.argv[1:]) if sys.argv and "esr-lab" in sys.argv[0] else \
        f"esr-lab catalog build --model {args.model}" + (f" --sae {args.sae}" if args.sae else "") + f" --tokens {args.tokens}"
    sae_name = repo_relative(spec)
    build_catalog(model, sae, texts, chats, out, progress=StderrProgress(), max_tokens=args.tokens,
                  batch_size=args.batch_size, budget_mb=args.budget_mb, command=cmd, sae_name=sae_name,
                  corpus_note=note)

    cat = Catalog.load(out)
    if not args.no_warm:
        warm_search(cat)
    print(json.dumps({"path": str(out), "d_sae": cat.d_sae, "n_tokens": cat.meta["n_tokens"],
                      "n_dead": cat.meta["n_dead"], "build_seconds": cat.meta["build_seconds"]}))
    return 0


def cmd_import(args) -> int:
    cat = _catalog(args)
    rep = import_neuronpedia(args.file, cat)
    print(rep.summary())
    for p in rep.problems:
        print(f"  {p}", file=sys.stderr)
    return 0


def cmd_clear(args) -> int:
    print("imported descriptions removed" if clear_import(_catalog(args)) else "nothing was imported")
    return 0


def cmd_refresh(args) -> int:
    what = args.what or list(REFRESHABLE)
    sae = load_sae(sae_spec(args))
    p = find_catalog(args.model, sae)
    if p is None:
        raise BadInput("No catalog for this SAE yet: build one with `esr-lab catalog build`")
    refresh_catalog(p, load_model(args.model), sae, what=what, progress=StderrProgress())
    print(f"{' and '.join(what)} recomputed in {p}")
    return 0


def cmd_info(args) -> int:
    cat = _catalog(args)
    info = cat.info()
    if args.json:
        dump_json(info)
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="find latents by description (semantic + exact words)")
    p.add_argument("query")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--min-density", type=float, default=None)
    p.add_argument("--max-density", type=float, default=None)
    p.add_argument("--include-dead", action="store_true")
    p.add_argument("--json", action="store_true", help="JSON list of {latent, description, score, density, max_act}")
    _common(p)
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser("latent", help="one latent's catalog entry (a feature page)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_latent)

    p = subparsers.add_parser("fires", help="which latents fire on TEXT (relative to their catalog maximum)")
    p.add_argument("text")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_fires)

    p = subparsers.add_parser("catalog", help="build or inspect latent catalogs")
    sub = p.add_subparsers(dest="catalog_command", metavar="ACTION")
    b = sub.add_parser("build", help="(re)build the catalog (default SAE: the shipped one in assets/catalog)")
    b.add_argument("--tokens", type=int, default=200_000, help="held-out tokens to read (default 200000)")
    b.add_argument("--chats", type=int, default=400, help="chat answers to read at most (default 400)")
    b.add_argument("--out", default=None, help="output folder (default: assets/catalog/<model> for the "
                                                "default SAE, else the user cache)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--budget-mb", type=float, default=12.0, help="storage budget that sizes the context lists")
    b.add_argument("--no-warm", action="store_true", help="skip computing the search embeddings")
    _common(b)
    b.set_defaults(func=cmd_build)
    i = sub.add_parser("import-neuronpedia", help="set descriptions from a Neuronpedia explanations .jsonl(.gz)")
    i.add_argument("file")
    _common(i)
    i.set_defaults(func=cmd_import)
    c = sub.add_parser("clear-import", help="drop imported descriptions (back to offline labels)")
    _common(c)
    c.set_defaults(func=cmd_clear)
    rf = sub.add_parser("refresh", help="recompute parts of the catalog in place: promoted/suppressed tokens "
                                        "(logit-effects) and lower-band contexts (bands); minutes on CPU")
    rf.add_argument("--what", action="append", choices=REFRESHABLE, help="part to recompute (repeatable; default all)")
    _common(rf)
    rf.set_defaults(func=cmd_refresh)
    n = sub.add_parser("info", help="where the catalog is and how it was built")
    n.add_argument("--json", action="store_true")
    _common(n)
    n.set_defaults(func=cmd_info)

    def _no_action(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_no_action)
