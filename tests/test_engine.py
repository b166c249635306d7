"""The steering engine on the real SmolLM2 model: exactness, parity, isolation, cancellation."""

import json
import threading

import pytest
import torch

from esr_core.errors import BadInput, ModelUnavailable, SaeUnavailable
from esr_core.models.hooks import hook_module
from esr_core.steering.engine import Engine
from esr_core.steering.interventions import Intervention
from esr_core.steering.spec import GenerationSpec, RunDone, TokenEvent, collect

PROMPT = "How do I boil an egg?"


class Capture:
    """Records (pre-steering, post-steering) residuals at the hook for every forward call.

    One hook runs before the engine's (prepend) and one after it, on the same module.
    """

    def __init__(self, engine: Engine):
        self.pre, self.post = [], []
        hp = hook_module(engine.model, engine.hook_name)
        self.handles = [hp.register_forward_hook(self._grab(self.pre), prepend=True),
                        hp.register_forward_hook(self._grab(self.post))]

    @staticmethod
    def _grab(store):
        def hook(_m, _inputs, output):
            store.append((output[0] if isinstance(output, tuple) else output).detach().clone())

        return hook

    @classmethod
    def around(cls, engine: Engine, spec: GenerationSpec) -> "Capture":
        """Run ``spec`` through the engine with the capture hooks on, then remove them."""
        cap = cls(engine)
        try:
            engine.generate(spec)
        finally:
            cap.close()
        return cap

    def deltas(self):
        """Per forward call: post - pre, shape [B, T, D]."""
        return [b - a for a, b in zip(self.pre, self.post)]

    def close(self):
        for h in self.handles:
            h.remove()


def _latent(engine, i=3):
    return i % engine.sae.d_sae


def test_add_is_exact_at_every_position_with_kv_cache(engine):
    i = _latent(engine)
    v = 2.5
    spec = GenerationSpec(prompt=PROMPT, interventions=[Intervention(i, "add", v, "raw", "all")],
                          max_new_tokens=6, runs=("steered",))
    cap = Capture.around(engine, spec)
    d = engine.sae.W_dec[i].detach().float()
    deltas = cap.deltas()
    assert len(deltas) == 7  # prefill + one forward per generated token (each token is read at its position)
    assert deltas[0].shape[1] > 10  # the prefill covers the whole prompt
    for delta in deltas:
        expected = (v * d).expand_as(delta[0])
        # float32 rounding of h + v*d - h scales with |h| (position 0 has |h| ~ 24,000)
        torch.testing.assert_close(delta[0], expected, atol=3e-3, rtol=1e-4)
    # generated-token forwards have seq_len 1: the classic KV-cache bug would skip them
    assert all(delta.shape[1] == 1 for delta in deltas[1:])


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_are_respected(engine, positions):
    i = _latent(engine, 5)
    spec = GenerationSpec(prompt=PROMPT, interventions=[Intervention(i, "add", 3.0, "raw", positions)],
                          max_new_tokens=4, runs=("steered",))
    cap = Capture.around(engine, spec)
    norms = [float(dl.norm()) for dl in cap.deltas()]
    prefill, gen = norms[0], norms[1:]
    if positions == "prompt":
        assert prefill > 1.0 and all(n == 0.0 for n in gen)
    else:
        assert prefill == 0.0 and all(n > 1.0 for n in gen)


def test_norm_units_scale_by_median_residual_norm(engine):
    i = _latent(engine, 7)
    spec = GenerationSpec(prompt=PROMPT, interventions=[Intervention(i, "add", 0.5, "norm", "all")],
                          max_new_tokens=1, runs=("steered",))
    cap = Capture.around(engine, spec)
    delta = cap.deltas()[0][0, 0]
    assert float(delta.norm()) == pytest.approx(0.5 * engine.median_norm, rel=1e-4)


def test_zero_strength_changes_nothing_and_large_strength_changes_text(engine):
    i = _latent(engine, 11)
    zero = engine.generate(GenerationSpec(prompt=PROMPT, max_new_tokens=12,
                                          interventions=[Intervention(i, "add", 0.0, "norm")]))
    assert zero["steered"].token_ids == zero["default"].token_ids
    big = engine.generate(GenerationSpec(prompt=PROMPT, max_new_tokens=12,
                                         interventions=[Intervention(i, "add", 20.0, "norm")]))
    assert big["steered"].text != big["default"].text
    assert big["default"].token_ids == zero["default"].token_ids


@pytest.mark.parametrize("mode,value", [("clamp", 4.0), ("ablate", 0.0), ("scale", 0.0)])
def test_clamp_ablate_scale_leave_latent_at_requested_value(engine, mode, value):
    # pick a latent that is active on this prompt so ablation has something to remove
    acts = engine.activations(text=PROMPT).z[1:]
    i = int(acts.max(dim=0).values.argmax())
    spec = GenerationSpec(prompt=PROMPT, interventions=[Intervention(i, mode, value, "raw", "all")],
                          watch=[i], max_new_tokens=5, runs=("steered",))
    res = engine.generate(spec)["steered"]
    assert res.acts.shape == (5, 1)
    assert res.prompt.acts[:, 0].tolist() == pytest.approx([value] * len(res.prompt.token_ids))
    assert res.acts[:, 0].tolist() == pytest.approx([value] * 5)
    # the same run without intervention reads a non-zero activation somewhere on the prompt
    plain = engine.generate(GenerationSpec(prompt=PROMPT, watch=[i], max_new_tokens=1, runs=("default",)))
    assert plain["default"].prompt.acts[1:, 0].max() > 0


def test_ablation_removes_the_latent_on_re_encoding(engine):
    acts = engine.activations(text=PROMPT).z[1:]
    i = int(acts.max(dim=0).values.argmax())
    before = engine.activations(text=PROMPT).z[1:, i]
    after = engine.activations(text=PROMPT, interventions=[Intervention(i, "ablate")]).z[1:, i]
    assert float(before.max()) > 0
    assert float(after.abs().max()) == 0.0


def test_greedy_matches_transformers_generate(engine):
    n = 24
    ours = engine.generate(GenerationSpec(prompt=PROMPT, max_new_tokens=n, runs=("default",),
                                          stop_at_eos=True))["default"]
    tok = engine.model.tokenizer
    ids = tok(engine.render_prompt(PROMPT), return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = engine.model.hf_model.generate(ids, max_new_tokens=n, do_sample=False, repetition_penalty=1.1)
    assert ours.token_ids == out[0, ids.shape[1]:].tolist()


def test_streaming_equals_non_streaming_and_pieces_concatenate(engine):
    spec = GenerationSpec(prompt="Write the word café three times.", max_new_tokens=16, watch=[1, 2],
                          interventions=[Intervention(_latent(engine, 13), "add", 3.0, "norm")])
    events = list(engine.stream(spec))
    streamed = collect(iter(events), spec)
    direct = engine.generate(spec)
    for run in ("steered", "default"):
        assert streamed[run].token_ids == direct[run].token_ids
        assert "".join(streamed[run].pieces) == streamed[run].text
        assert streamed[run].text == engine.model.tokenizer.decode(
            [t for t in streamed[run].token_ids if t not in engine._eos_ids])
    steps = [e.step for e in events if isinstance(e, TokenEvent) and e.run == "steered"]
    assert steps == list(range(len(steps)))
    assert sum(isinstance(e, RunDone) for e in events) == 2


def test_sampling_is_seeded_and_batch_equals_one_by_one(engine):
    mk = lambda seed: GenerationSpec(prompt="Tell me a fact about the sea.", temperature=0.8, top_p=0.9,
                                     max_new_tokens=10, seed=seed, runs=("default",))
    a1 = engine.generate(mk(1))["default"].token_ids
    a2 = engine.generate(mk(1))["default"].token_ids
    b = engine.generate(mk(2))["default"].token_ids
    assert a1 == a2 and a1 != b
    specs = [GenerationSpec(prompt=p, max_new_tokens=8, runs=("default",))
             for p in ("How do I boil an egg?", "Explain how to tie a shoelace properly, step by step.")]
    batched = engine.generate_batch(specs)
    alone = [engine.generate(s)["default"].token_ids for s in specs]
    assert [r["default"].token_ids for r in batched] == alone


def test_two_threads_with_different_steering_do_not_leak(engine):
    specs = [GenerationSpec(prompt=PROMPT, max_new_tokens=10, runs=("steered",),
                            interventions=[Intervention(_latent(engine, 17), "add", 12.0, "norm")]),
             GenerationSpec(prompt=PROMPT, max_new_tokens=10, runs=("steered",),
                            interventions=[Intervention(_latent(engine, 19), "add", -12.0, "norm")]),
             GenerationSpec(prompt=PROMPT, max_new_tokens=10, runs=("default",))]
    alone = [engine.generate(s) for s in specs]
    results = [None] * len(specs)
    barrier = threading.Barrier(len(specs))

    def work(k):
        barrier.wait()
        results[k] = engine.generate(specs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, s in enumerate(specs):
        run = s.runs[0]
        assert results[k][run].token_ids == alone[k][run].token_ids
    assert alone[0]["steered"].token_ids != alone[2]["default"].token_ids


def test_cancel_from_another_thread_stops_within_one_token(engine):
    cancel = threading.Event()
    spec = GenerationSpec(prompt=PROMPT, max_new_tokens=200, runs=("default",), stop_at_eos=False)
    seen = []
    done = []
    for ev in engine.stream(spec, cancel=cancel):
        if isinstance(ev, TokenEvent):
            seen.append(ev)
            if len(seen) == 3:
                threading.Thread(target=cancel.set).start()
                threading.Event().wait(0.5)  # let the other thread set it
        elif isinstance(ev, RunDone):
            done.append(ev)
    assert len(seen) <= 4
    assert done and done[0].stop_reason == "cancelled"


def test_model_is_clean_after_a_failed_call(engine):
    ids = torch.tensor([engine.model.tokenizer(PROMPT).input_ids])
    with torch.inference_mode():
        before = engine.model.hf_model(ids).logits
    with pytest.raises(BadInput):
        engine.generate(GenerationSpec(prompt=PROMPT, interventions=[
            Intervention(1, "add", 5.0), Intervention(10 ** 9, "add", 1.0)]))
    cancel = threading.Event()
    gen = engine.stream(GenerationSpec(prompt=PROMPT, max_new_tokens=50,
                                       interventions=[Intervention(1, "add", 30.0, "norm")]), cancel=cancel)
    next(gen)
    gen.close()  # abandoned mid-stream
    with torch.inference_mode():
        after = engine.model.hf_model(ids).logits
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("spec_kw,msg", [
    (dict(prompt="   "), "empty"),
    (dict(prompt=PROMPT, interventions=[Intervention(1, "add", float("nan"))]), "finite"),
    (dict(prompt=PROMPT, interventions=[Intervention(1, "add", float("inf"))]), "finite"),
    (dict(prompt=PROMPT, interventions=[Intervention(1, "add", 1e9)]), "absurd"),
    (dict(prompt=PROMPT, interventions=[Intervention(10 ** 7, "add", 1.0)]), "out of range"),
    (dict(prompt=PROMPT, watch=[-1]), "out of range"),
    (dict(prompt=PROMPT, max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=PROMPT, temperature=float("nan")), "finite"),
    (dict(prompt="word " * 9000), "limit"),
])
def test_bad_requests_get_clear_errors(engine, spec_kw, msg):
    with pytest.raises(BadInput, match=msg):
        engine.generate(GenerationSpec(**spec_kw))


def test_unknown_model_and_corrupt_sae_fail_clearly(tmp_path):
    from esr_core.models.loading import load_model
    from esr_core.models.sae import load_sae

    with pytest.raises(ModelUnavailable, match="not available offline"):
        load_model("no-such-org/no-such-model")
    bad = tmp_path / "bad_sae"
    bad.mkdir()
    (bad / "cfg.json").write_text("{not json")
    (bad / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SaeUnavailable, match="corrupt"):
        load_sae(str(bad))
    (bad / "cfg.json").write_text(json.dumps({"d_in": 576, "d_sae": 8, "architecture": "topk", "k": 2,
                                              "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    with pytest.raises(SaeUnavailable, match="Could not load"):
        load_sae(str(bad))
    with pytest.raises(SaeUnavailable, match="does not exist"):
        load_sae(str(tmp_path / "missing"))


def test_spec_round_trips_through_json():
    spec = GenerationSpec(prompt=PROMPT, interventions=[Intervention(3, "clamp", 2.0, "raw", "generated")],
                          watch=[1, 2], seed=7, temperature=0.6)
    again = GenerationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_shipped_default_answers_are_the_engines_greedy_answers():
    """`esr-lab prompts answer` (engine backend) reproduces the shipped unsteered answers."""
    from esr_core.judge.prompts import ANSWER_SETTINGS, load_default_answer_records
    from esr_core.steering.engines import get_engine

    recs = sorted(load_default_answer_records(), key=lambda r: len(r["answer"]))[:2]
    eng = get_engine(ANSWER_SETTINGS["model"])
    specs = [GenerationSpec(prompt=r["prompt"], temperature=0.0, repetition_penalty=ANSWER_SETTINGS["repetition_penalty"],
                            max_new_tokens=ANSWER_SETTINGS["max_new_tokens"], seed=ANSWER_SETTINGS["seed"],
                            runs=("default",)) for r in recs]
    got = [res["default"].text.strip() for res in eng.generate_batch(specs)]
    assert got == [r["answer"] for r in recs]
    assert recs[0]["settings"]["generated_with"] == "esr_core.steering.engine.generate_batch"


def test_generation_passes_the_kv_cache_under_the_current_keyword(engine):
    """transformers 5.25 renamed the forward's ``past_key_values`` to ``cache`` and drops the old
    name in 5.40: generation must use whichever name the installed release takes."""
    import warnings

    from esr_core.models.loading import kv_cache_arg

    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return None

    assert kv_cache_arg(Old()) == "past_key_values"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = engine.generate(GenerationSpec(prompt="How do I boil an egg?", max_new_tokens=3, runs=["default"]))
    assert len(res["default"].token_ids) == 3
    assert not [w for w in caught if "past_key_values" in str(w.message)]
