"""Model shapes of the three families, as plain data (no torch), shared by engine, planner and simulator.

Figures follow the public Hugging Face configs:
- facebook/opt-6.7b: 32 layers, hidden 4096, 32 heads, ffn 16384, vocab 50272, 2048 learned
  positions (offset 2), pre-LayerNorm, ReLU, biases everywhere, LM head tied to the embedding.
- EleutherAI/gpt-neox-20b: 44 layers, hidden 6144, 64 heads, intermediate 24576, vocab 50432,
  rotary on 25% of each head (base 10000), parallel attention + MLP, GELU ("gelu_fast" in the
  public config), untied LM head.
- huggyllama/llama-30b: 60 layers, hidden 6656, 52 heads, intermediate 17920, vocab 32000,
  RMSNorm (eps 1e-6), SwiGLU, rotary, no biases, untied LM head.
The issue's figures agree with these configs (tests/models/test_hf_names.py holds the public
configs and checks every shape field, and checks total_params against transformers' own model).
Differences, all outside the shapes: the public gpt-neox-20b config has no pad_token_id (we use 1,
the tokenizer's <|padding|>; a spec read from that config pads with eos 0), and transformers 5.x
defaults GPT-NeoX to "gelu" where the public config says "gelu_fast" (tanh approximation).

The paper's simulated "30B" was a GPT-style stand-in (48 x 7168); `paper-30b` describes it so the
simulator can use the name with the shape that was profiled (profiles-t4/megatron_h7168).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

FAMILIES = ("opt", "gpt_neox", "llama")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Activations the reference forward pass implements (HF names; gelu_fast/gelu_new = tanh approximation).
ACTIVATIONS = ("relu", "gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "silu")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # opt | gpt_neox | llama
    num_layers: int
    hidden: int
    num_heads: int
    ffn: int
    vocab: int
    max_positions: int = 2048
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    norm_eps: float = 1e-5
    rotary_pct: float = 1.0  # fraction of head_dim that gets rotary (gpt_neox: 0.25)
    rotary_base: float = 10000.0
    tie_word_embeddings: bool = False
    activation: str = "relu"  # relu | gelu | gelu_fast | silu
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        for field in ("num_layers", "hidden", "num_heads", "ffn", "vocab", "max_positions"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.hidden % self.num_heads:
            raise ValueError(f"{self.name}: hidden {self.hidden} is not divisible by {self.num_heads} heads")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}: unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"{self.name}: rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} heads not divisible by {self.kv_heads} kv heads")

    # --- derived shape -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def has_bias(self) -> bool:
        return self.family != "llama"

    @property
    def norm(self) -> str:
        return "rmsnorm" if self.family == "llama" else "layernorm"

    @property
    def rotary(self) -> bool:
        return self.family != "opt"

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    def valid_tp(self, tp: int) -> bool:
        """A tp degree is valid when it splits the (kv) heads evenly."""
        return tp >= 1 and self.num_heads % tp == 0 and self.kv_heads % tp == 0

    # --- sizes (elements), used by the memory model and the mapper --------------------------
    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, f = self.hidden, self.ffn
        kv = self.kv_heads * self.head_dim
        attn = h * (h + 2 * kv) + h * h
        mlp = (3 if self.gated_mlp else 2) * h * f
        norms = 2 * h * (2 if self.norm == "layernorm" else 1)
        bias = (h + 2 * kv + h + f + h) if self.has_bias else 0
        return attn + mlp + norms + bias

    def embedding_params(self) -> int:
        """Token (and learned position) embeddings, final norm and LM head."""
        emb = self.vocab * self.hidden
        pos = (self.max_positions + 2) * self.hidden if self.family == "opt" else 0
        head = 0 if self.tie_word_embeddings else self.vocab * self.hidden
        final_norm = self.hidden * (2 if self.norm == "layernorm" else 1)
        return emb + pos + head + final_norm

    def total_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params()

    def kv_elems_per_token_layer(self) -> int:
        """K and V elements one token occupies in one layer's cache."""
        return 2 * self.kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


# Real shapes of the paper's three families.
OPT_6_7B = ModelSpec("opt-6.7b", "opt", 32, 4096, 32, 16384, 50272, tie_word_embeddings=True,
                     activation="relu", bos_token_id=2, eos_token_id=2, pad_token_id=1)
GPT_NEOX_20B = ModelSpec("gpt-neox-20b", "gpt_neox", 44, 6144, 64, 24576, 50432, rotary_pct=0.25,
                         activation="gelu_fast", bos_token_id=0, eos_token_id=0, pad_token_id=1)
LLAMA_30B = ModelSpec("llama-30b", "llama", 60, 6656, 52, 17920, 32000, norm_eps=1e-6, activation="silu")
# The GPT-style stand-in the paper profiled and simulated as "LLaMA-30B" (profile megatron_h7168).
PAPER_30B = ModelSpec("paper-30b", "opt", 48, 7168, 56, 4 * 7168, 50272, tie_word_embeddings=True)

# Tiny shapes for CPU tests: odd sizes on purpose (6 heads, 5 layers) so uneven splits get exercised.
OPT_TINY = replace(OPT_6_7B, name="opt-tiny", num_layers=5, hidden=48, num_heads=6, ffn=96, vocab=160,
                   max_positions=128)
GPT_NEOX_TINY = replace(GPT_NEOX_20B, name="gpt-neox-tiny", num_layers=5, hidden=48, num_heads=6, ffn=192,
                        vocab=160, max_positions=128)
LLAMA_TINY = replace(LLAMA_30B, name="llama-tiny", num_layers=5, hidden=48, num_heads=6, ffn=80, vocab=160,
                     max_positions=128)

_SPECS = {s.name: s for s in (OPT_6_7B, GPT_NEOX_20B, LLAMA_30B, PAPER_30B, OPT_TINY, GPT_NEOX_TINY, LLAMA_TINY)}
# Short names used by the paper and the experiment CLI.
ALIASES = {"6.7B": "opt-6.7b", "20B": "gpt-neox-20b", "30B": "llama-30b"}


def list_specs() -> list[str]:
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """Look a spec up by name or paper alias ('6.7B', '20B', '30B'); raises KeyError listing the names."""
    key = ALIASES.get(name, name)
    if key not in _SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_specs())}")
    return _SPECS[key]
