"""Steer at one layer, read at another (#13): the engine with a second, readout SAE.

The real SmolLM2 model and the shipped layer-15 SAE steer; a seeded synthetic SAE-Lens TopK
SAE at ``blocks.20.hook_resid_post`` reads (always synthetic, for determinism). Every readout
is checked against a direct forward pass steered by hand with plain torch hooks.
"""

import json
from pathlib import Path

import pytest
import torch

from esr_core.errors import BadInput, EsrError
from esr_core.models.hooks import decoder_layers, hook_module, parse_resid_hook
from esr_core.steering.engine import Engine
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec, PromptReadout, TokenEvent

MODEL = "smollm2-135m-instruct"
READ_HOOK = "blocks.20.hook_resid_post"
READ_D_SAE = 512
PROMPT = "How do I boil an egg?"
TEXT = "The kettle clicked off and steam curled up towards the kitchen window."


def build_sae(folder: Path, d_sae: int, layer: int, seed: int, d_in: int = 576, k: int = 16) -> Path:
    """A seeded SAE-Lens TopK SAE (cfg.json + sae_weights.safetensors), untied encoder and biases."""
    from sae_lens import TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        W = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    sae.save_model(str(folder))
    (folder / "esr_meta.json").write_text(json.dumps({"median_resid_norm": 100.0, "note": "readout test SAE"}))
    return folder


@pytest.fixture(scope="module")
def read_dir(tmp_path_factory) -> Path:
    return build_sae(tmp_path_factory.mktemp("read_sae") / "L20", READ_D_SAE, 20, seed=7)


@pytest.fixture(scope="module")
def read_engine(sae_spec, read_dir):
    from esr_core.steering.engines import get_engine

    return get_engine(MODEL, sae_spec, str(read_dir))  # the CLI test's engine too (same key)


def _layer(hook: str) -> int:
    layer, kind = parse_resid_hook(hook)
    assert kind == "post"
    return layer


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def direct_readout(engine: Engine, ids: list[int], add: list[tuple[int, float]] = (),
                   read_hook: str | None = None) -> torch.Tensor:
    """The readout SAE's code at the readout hook for ``ids`` [T] in one plain forward, with
    ``coef * W_dec[latent]`` of the steering SAE added by hand at every position of the
    steering hook's output. Plain torch hooks: no engine code runs."""
    hf = engine.model.hf_model
    blocks = decoder_layers(hf)
    steer_mod = blocks[_layer(engine.hook_name)]
    read_hook = read_hook or engine.read_hook_name
    read_mod = blocks[_layer(read_hook)]
    W = engine.sae.W_dec.detach().float().to(engine.device)
    got = {}

    def steer(_m, _i, out):
        h = _out(out).clone()
        for latent, coef in add:
            h = h + coef * W[latent].to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def grab(_m, _i, out):
        got["h"] = _out(out).detach().clone()

    handles = [steer_mod.register_forward_hook(steer)] if add else []
    handles.append(read_mod.register_forward_hook(grab))
    try:
        with torch.inference_mode():
            hf(input_ids=torch.tensor([ids], device=engine.device))
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():
        return engine.read_sae.encode(got["h"]).float()[0].cpu()


def test_the_engine_names_both_saes(read_engine, engine, read_dir):
    assert read_engine.has_readout_sae
    assert read_engine.read_hook_name == READ_HOOK == read_engine.read_sae.hook_name
    assert read_engine.read_sae.d_sae == READ_D_SAE and read_engine.sae.d_sae != READ_D_SAE
    assert read_engine.sae.source == engine.sae.source and read_engine.hook_name == engine.hook_name
    assert Path(read_engine.read_sae.source) == read_dir
    assert engine.read_sae is engine.sae and engine.read_hook_name == engine.hook_name
    assert not engine.has_readout_sae


def test_activations_read_the_readout_sae_after_the_steering(read_engine):
    latent, coef = 5, 40.0
    iv = Intervention(latent, "add", coef, "raw", "all")
    res = read_engine.activations(text=TEXT, interventions=[iv])
    assert res.z.shape == (len(res.token_ids), READ_D_SAE)
    want = direct_readout(read_engine, res.token_ids, [(latent, coef)])
    assert torch.allclose(res.z, want, atol=1e-5, rtol=0), (res.z - want).abs().max()
    # the steering reached the readout: unsteered, the code differs (and matches an unsteered direct pass)
    plain = read_engine.activations(text=TEXT)
    assert torch.allclose(plain.z, direct_readout(read_engine, res.token_ids), atol=1e-5, rtol=0)
    assert (plain.z - res.z).abs().max() > 1e-2


def test_a_steered_latent_is_read_on_the_steering_sae_not_at_the_readout_sae_s_same_id(read_engine, engine):
    """A replay with steering shows the distractor's own activation: its id belongs to the steering SAE
    (here beyond the readout SAE's 512 latents, which once raised IndexError in `detectors separation`)."""
    from esr_core.resistance.view import replay_episode

    latent = read_engine.sae.d_sae - 1
    assert latent >= READ_D_SAE
    iv = Intervention(latent, "add", 40.0, "raw", "all")
    res = read_engine.activations(text=TEXT, interventions=[iv])
    same = engine.activations(text=TEXT, interventions=[iv])
    assert res.z_steer.shape == (len(res.token_ids), read_engine.sae.d_sae)
    assert torch.allclose(res.z_steer, same.z, atol=1e-5, rtol=0)  # the steering SAE's code, after the steering
    assert same.z_steer is same.z  # one SAE: the readout is the steering code
    prompt, answer = "How do I boil an egg?", "Put the egg in boiling water for eight minutes, then cool it."
    rep = replay_episode(read_engine, prompt, answer, None, steering=[iv])
    ref = replay_episode(engine, prompt, answer, None, steering=[iv])
    got, want = rep["distractor_series"][latent], ref["distractor_series"][latent]
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert max(want) > 1.0  # the steered latent is active where it is added


def test_clamp_uses_the_steering_code_and_the_readout_stays_downstream(read_engine):
    """A clamp needs the steering SAE's code at layer 15; the readout is still layer 20's."""
    sae = read_engine.sae
    res0 = read_engine.activations(text=TEXT)
    iv = Intervention(7, "clamp", 30.0, "raw", "all")
    res = read_engine.activations(text=TEXT, interventions=[iv])
    # by hand: h15 += (30 - z_7(h15)) * W_dec[7], then read at 20
    hf = read_engine.model.hf_model
    blocks = decoder_layers(hf)
    W = sae.W_dec.detach().float()
    got = {}

    def clamp(_m, _i, out):
        h = _out(out).clone()
        z = sae.encode(h).float()
        h = h + (30.0 - z[..., 7:8]) * W[7]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handles = [blocks[15].register_forward_hook(clamp),
               blocks[20].register_forward_hook(lambda _m, _i, out: got.__setitem__("h", _out(out).clone()))]
    try:
        with torch.inference_mode():
            hf(input_ids=torch.tensor([res.token_ids]))
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():
        want = read_engine.read_sae.encode(got["h"]).float()[0]
    assert torch.allclose(res.z, want, atol=1e-4, rtol=0), (res.z - want).abs().max()
    assert (res.z - res0.z).abs().max() > 1e-2


def test_greedy_generation_reads_the_readout_sae_and_generates_the_same_tokens(read_engine, engine):
    latent, coef = 5, 40.0
    ivs = [Intervention(latent, "add", coef, "raw", "all")]
    watch = list(range(READ_D_SAE))  # every readout latent: k of them fire at each token
    spec = GenerationSpec(prompt=PROMPT, interventions=ivs, watch=watch, top_k=8, max_new_tokens=8,
                          runs=("steered", "default"), temperature=0.0)
    events = list(read_engine.stream(spec))
    for run, add in (("steered", [(latent, coef)]), ("default", [])):
        prompt = next(e for e in events if isinstance(e, PromptReadout) and e.run == run)
        toks = [e for e in events if isinstance(e, TokenEvent) and e.run == run]
        assert toks, run
        ids = list(prompt.token_ids) + [e.token_id for e in toks]
        want = direct_readout(read_engine, ids, add)  # [T, 512]
        n = len(prompt.token_ids)
        assert torch.allclose(torch.tensor(prompt.acts), want[:n, watch], atol=1e-4, rtol=0)
        got = torch.tensor([[e.acts[i] for i in watch] for e in toks])
        assert torch.allclose(got, want[n:n + len(toks), watch], atol=1e-4, rtol=0), \
            (run, (got - want[n:n + len(toks), watch]).abs().max())
        assert any(v > 0 for e in toks for v in e.acts.values()), "nothing watched ever fired"
        for k, e in enumerate(toks):  # top latents are the readout SAE's, in its order
            assert e.top and all(0 <= i < READ_D_SAE for i, _ in e.top)
            ref = want[n + k]
            assert e.top[0][0] == int(ref.argmax()) and abs(e.top[0][1] - float(ref.max())) < 1e-4
    # the readout never changes what is generated
    same = GenerationSpec(prompt=PROMPT, interventions=ivs, watch=watch, top_k=8, max_new_tokens=8,
                          runs=("steered", "default"), temperature=0.0)
    plain = engine.generate(same)
    for run in ("steered", "default"):
        mine = [e.token_id for e in events if isinstance(e, TokenEvent) and e.run == run]
        assert mine == plain[run].token_ids, run


def test_latent_ids_are_checked_against_the_sae_they_belong_to(read_engine, read_dir, tmp_path):
    from esr_core.models.sae import load_sae

    big = READ_D_SAE + 88  # a steering latent, beyond the readout SAE
    assert big < read_engine.sae.d_sae
    with pytest.raises(BadInput, match="readout SAE"):
        read_engine.generate(GenerationSpec(prompt=PROMPT, watch=[big], max_new_tokens=1, runs=("steered",)))
    with pytest.raises(BadInput, match="out of range"):
        read_engine._check_watch([big])
    compiled = read_engine.compile_interventions([Intervention(big, "add", 2.0, "raw", "all")])
    assert compiled[0][0].latent == big
    res = read_engine.generate(GenerationSpec(prompt=PROMPT, interventions=[Intervention(big, "add", 2.0, "raw")],
                                              watch=[3], max_new_tokens=1, runs=("steered",)))
    assert res["steered"].acts.shape == (1, 1)
    # a small steering SAE and the 512-latent readout: latent 100 is a readout latent only
    small = build_sae(tmp_path / "steer64", 64, 15, seed=3)
    eng = Engine(read_engine.model, load_sae(str(small)), load_sae(str(read_dir)))  # not cached: closed below
    try:
        assert eng.sae.d_sae == 64 and eng.read_sae.d_sae == READ_D_SAE
        with pytest.raises(BadInput, match="out of range"):
            eng.compile_interventions([Intervention(100, "add", 2.0, "raw", "all")])
        with pytest.raises(BadInput, match="out of range"):
            eng.generate(GenerationSpec(prompt=PROMPT, interventions=[Intervention(100, "add", 2.0, "raw")],
                                        max_new_tokens=1, runs=("steered",)))
        assert eng._check_watch([100]) == [100]
        out = eng.generate(GenerationSpec(prompt=PROMPT, watch=[100], max_new_tokens=1, runs=("steered",)))
        assert out["steered"].acts.shape == (1, 1)
    finally:
        eng.close()


def test_a_readout_upstream_of_the_steering_sees_none_of_it(read_engine, tmp_path):
    early = build_sae(tmp_path / "L10", 128, 10, seed=11)
    from esr_core.models.sae import load_sae

    eng = Engine(read_engine.model, read_engine.sae, load_sae(str(early)))
    try:
        iv = Intervention(5, "add", 40.0, "raw", "all")
        steered = eng.activations(text=TEXT, interventions=[iv])
        plain = eng.activations(text=TEXT)
        assert torch.equal(steered.z, plain.z)
        assert torch.allclose(plain.z, direct_readout(eng, plain.token_ids), atol=1e-5, rtol=0)
    finally:
        eng.close()


def test_close_removes_both_hooks_and_widths_must_match(read_engine, read_dir, tmp_path):
    from esr_core.models.sae import load_sae

    model = read_engine.model
    eng = Engine(model, read_engine.sae, load_sae(str(read_dir)))
    steer_mod, read_mod = hook_module(model, eng.hook_name), hook_module(model, eng.read_hook_name)
    ids = (eng._handle.id, eng._read_handle.id)
    assert ids[0] in steer_mod._forward_hooks and ids[1] in read_mod._forward_hooks
    eng.close()
    assert ids[0] not in steer_mod._forward_hooks and ids[1] not in read_mod._forward_hooks
    # the steering SAE itself as readout: one hook, no readout SAE
    same = Engine(model, read_engine.sae, read_engine.sae)
    try:
        assert not same.has_readout_sae and same._read_handle is None and same.read_sae is same.sae
    finally:
        same.close()
    narrow = build_sae(tmp_path / "narrow", 32, 20, seed=1, d_in=64)
    n_hooks = len(read_mod._forward_hooks)
    with pytest.raises(EsrError, match="d_model 576"):
        Engine(model, read_engine.sae, load_sae(str(narrow)))
    assert len(read_mod._forward_hooks) == n_hooks


def test_engine_cache_keys_tell_readout_choices_apart(sae_spec, read_dir):
    from esr_core.app import engine_loader
    from esr_core.steering import engines

    assert engines.engine_key(MODEL, sae_spec) == (MODEL, sae_spec)
    assert engines.engine_key(MODEL, sae_spec, sae_spec) == (MODEL, sae_spec)
    assert engines.engine_key(MODEL, sae_spec, str(read_dir)) == (MODEL, sae_spec, str(read_dir))
    for args in ((MODEL, sae_spec, None), (MODEL, sae_spec, sae_spec), (MODEL, sae_spec, str(read_dir))):
        assert engine_loader._key(*args) == engines.engine_key(*args)
    a = engines.get_engine(MODEL, sae_spec, str(read_dir))
    b = engines.get_engine(MODEL, sae_spec)
    assert a is not b and a.has_readout_sae and not b.has_readout_sae
    ja, jb = engine_loader.request(MODEL, sae_spec, str(read_dir)), engine_loader.request(MODEL, sae_spec)
    assert ja is not jb and ja.info.get("read_sae") == str(read_dir) and "read_sae" not in jb.info
    ja.join()
    jb.join()
    assert engine_loader.ready_engine(MODEL, sae_spec, str(read_dir)) is a
    assert engine_loader.ready_engine(MODEL, sae_spec) is b


def test_run_record_keeps_the_readout_sae(read_dir):
    from esr_core.app.run_record import RunRecord
    from esr_core.steering.spec import RunResult

    rec = RunRecord(spec=GenerationSpec(prompt=PROMPT, watch=[3]), model=MODEL, sae="assets/sae/x",
                    results={"steered": RunResult(run="steered", stop_reason="max_new_tokens", watch=[3])},
                    read_sae=str(read_dir))
    back = RunRecord.from_json(rec.to_json())
    assert back.read_sae == str(read_dir) and back.sae == "assets/sae/x" and back.id == rec.id
    old = rec.to_dict()
    del old["read_sae"]  # a record saved before readout SAEs existed
    assert RunRecord.from_dict(old).read_sae is None
    plain = RunRecord(spec=rec.spec, model=MODEL, sae="s", results=rec.results)
    assert "read_sae" not in plain.to_dict() and RunRecord.from_dict(plain.to_dict()).read_sae is None
    bad = rec.to_dict()
    bad["read_sae"] = 5
    with pytest.raises(BadInput, match="read_sae"):
        RunRecord.from_dict(bad)


def test_cli_generate_records_the_readout_sae(read_dir, capsys):
    from esr_core.cli import main

    assert main(["generate", "--prompt", PROMPT, "--steer-raw", "5:40", "--max-new-tokens", "4", "--only", "steered",
                 "--watch", "3,511", "--read-sae", str(read_dir), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    head = lines[0]
    assert head["read_sae"] == {"source": str(read_dir), "hook": READ_HOOK, "same_as_sae": False}
    assert head["sae"]["hook"] == "blocks.15.hook_resid_post" and head["model"] == MODEL
    toks = [x for x in lines if "step" in x]
    assert len(toks) == 4 and all(set(x["acts"]) == {"3", "511"} for x in toks)
    assert all(0 <= int(i) < READ_D_SAE for x in toks for i, _ in x["top"])
    # text output names both hooks; a watched id beyond the readout SAE fails before generating
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--only", "steered",
                 "--read-sae", str(read_dir)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "@ blocks.15.hook_resid_post" in first and f"readout SAE {read_dir} @ {READ_HOOK}" in first
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--watch", "600",
                 "--read-sae", str(read_dir)]) == 2
    assert "readout SAE" in capsys.readouterr().err


def test_sidebar_readout_sae_picker(read_dir, monkeypatch):
    """The sidebar offers "same as steering SAE" and the SAE folders; a choice loads the engine
    that steers with the SAE and reads the chosen one, and says which hook it reads."""
    from conftest import warm_app_engine
    from streamlit.testing.v1 import AppTest

    from esr_core.app import engine_loader
    from esr_core.app import session as svc
    from esr_core.models.registry import DEFAULT_MODEL

    allowed = svc.check_sae_choice
    monkeypatch.setattr(svc, "readout_sae_folders", lambda d_model=None: svc.local_sae_folders() + [str(read_dir)])
    monkeypatch.setattr(svc, "check_sae_choice", lambda s: str(s) if s and Path(str(s)) == read_dir else allowed(s))
    warm_app_engine()
    engine_loader.request(DEFAULT_MODEL, svc.default_sae_for(DEFAULT_MODEL), str(read_dir)).join()
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=600).run()
    assert not at.exception, [x.value for x in at.exception]
    pick = at.selectbox(key="w_read_sae")
    assert pick.value == "same as steering SAE" and str(read_dir) in pick.options
    assert not at.session_state.engine.has_readout_sae
    assert "reads `" not in " ".join(m.value for m in at.sidebar.markdown)
    pick.select(str(read_dir)).run()
    assert not at.exception, [x.value for x in at.exception]
    eng = at.session_state.engine
    assert eng.has_readout_sae and eng.read_hook_name == READ_HOOK and eng.hook_name == "blocks.15.hook_resid_post"
    side = " ".join(m.value for m in at.sidebar.markdown)
    assert f"reads `{READ_HOOK}`" in side and "at `blocks.15.hook_resid_post`" in side
    assert at.session_state.engine_key[0] == DEFAULT_MODEL and at.session_state.engine_read_sae == str(read_dir)
    at.selectbox(key="w_read_sae").select("same as steering SAE").run()
    assert not at.session_state.engine.has_readout_sae and at.session_state.engine_read_sae is None


SHIPPED_L20 = Path(__file__).resolve().parent.parent / "assets" / "sae" / "smollm2-135m-instruct-L20"


@pytest.mark.skipif(not (SHIPPED_L20 / "cfg.json").exists(), reason="needs the shipped block-20 SAE")
def test_the_correction_overlay_reads_the_readout_sae(sae_spec, tmp_path, capsys):
    """With a readout SAE the overlay reads its circuit there: the batched unsteered replay gives
    the same per-token circuit activity as the engine's own readout of the same chat, the
    block-20 circuit is the one used, the distractor lane is left out, and the file says so."""
    from esr_core.cli import main
    from esr_core.experiments import overlay as co
    from esr_core.experiments.overlay_summary import describe
    from esr_core.steering.engines import get_engine

    eng = get_engine(MODEL, sae_spec, str(SHIPPED_L20))
    params = co.OverlayParams(n_synthetic=1, window=6, n_baseline=2)
    circuit, bt, _ = co.resolve_groups(eng, params)
    assert circuit.matches(eng) and not circuit.matches(eng, steering=True)
    item = {"id": "x", "source": "baseline", "key": "k", "prompt": PROMPT, "distractor": 5,
            "response": "Put the egg in boiling water for about nine minutes, then cool it in cold water."}
    got = []
    co._replay(eng, [item], {"circuit": circuit, "backtracking": bt}, params, got.append, None, lambda: None)
    acts = eng.activations(messages=[{"role": "user", "content": PROMPT},
                                     {"role": "assistant", "content": item["response"]}])
    direct = co._episode_record(item, acts.text, acts.offsets, acts.z, {"circuit": circuit, "backtracking": bt},
                                same_sae=False)
    assert got[0]["n"] == direct["n"] > 10
    assert got[0]["circuit"] == pytest.approx(direct["circuit"], abs=2e-3)
    assert got[0]["distractor"] is None  # a steering-SAE id means nothing in the readout's code

    out = tmp_path / "syn"
    assert main(["experiment", "overlay", str(out), "--synthetic", "2", "--baseline", "3", "--window", "6",
                 "--read-sae", str(SHIPPED_L20), "--json"]) == 0
    ov = json.loads(capsys.readouterr().out)
    assert ov["read_sae"]["hook"] == "blocks.20.hook_resid_post" and ov["hook"] == "blocks.15.hook_resid_post"
    assert ov["groups"]["circuit"]["members"] == list(circuit.members)
    assert "readout SAE at blocks.20.hook_resid_post" in describe(ov)
    assert main(["experiment", "overlay", str(tmp_path / "bad"), "--synthetic", "1",
                 "--read-sae", str(tmp_path / "nowhere")]) == 2


@pytest.mark.skipif(not (SHIPPED_L20 / "cfg.json").exists(), reason="needs the shipped block-20 SAE")
def test_leads_read_the_circuit_of_the_readout_sae(sae_spec, capsys):
    """`experiment leads --read-sae` uses the readout SAE's circuit, and refuses a group of another SAE."""
    from esr_core.cli import main

    ref = Path(__file__).resolve().parent.parent / "assets" / "experiments" / "reference"
    circuit15 = Path(__file__).resolve().parent.parent / "assets" / "groups" / "resistance_circuit.json"
    assert main(["experiment", "leads", str(ref), "--read-sae", str(SHIPPED_L20), "--group", str(circuit15)]) == 2
    assert "another model or readout SAE" in capsys.readouterr().err


@pytest.mark.skipif(not (SHIPPED_L20 / "cfg.json").exists(), reason="needs the shipped block-20 SAE")
def test_a_shared_link_carries_the_readout_sae():
    """The readout SAE travels in the URL (``read``, relative to the checkout for shipped SAEs):
    opening the link loads the engine that reads it; a folder the server may not open is
    refused with a message, and the steering SAE is kept."""
    from conftest import warm_app_engine
    from streamlit.testing.v1 import AppTest

    from esr_core.app import engine_loader
    from esr_core.app import session as svc
    from esr_core.models.registry import DEFAULT_MODEL

    app = str(Path(__file__).resolve().parent.parent / "app.py")
    warm_app_engine()
    engine_loader.request(DEFAULT_MODEL, svc.default_sae_for(DEFAULT_MODEL), str(SHIPPED_L20)).join()
    at = AppTest.from_file(app, default_timeout=600)
    at.query_params["read"] = "assets/sae/smollm2-135m-instruct-L20"
    at.switch_page("pages/steering.py").run()
    assert not at.exception, [x.value for x in at.exception]
    eng = at.session_state.engine
    assert eng.has_readout_sae and eng.read_hook_name == "blocks.20.hook_resid_post"
    assert at.query_params["read"] in ("assets/sae/smollm2-135m-instruct-L20", ["assets/sae/smollm2-135m-instruct-L20"])
    bad = AppTest.from_file(app, default_timeout=600)
    bad.query_params["read"] = "/etc"
    bad.switch_page("pages/steering.py").run()
    assert not bad.exception, [x.value for x in bad.exception]
    assert not bad.session_state.engine.has_readout_sae
    assert any("readout" in w.value.lower() or "outside" in w.value for w in bad.warning), [w.value for w in bad.warning]
