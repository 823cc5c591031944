"""Parameter counts of the paper-shaped configs and FLOPs per token, against hand counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import load_config
from pretrain.model import Transformer, config_parameters, count_parameters, flops_per_token, language_model_loss


def build_on_meta(path, overrides=()):
    cfg = load_config(path, list(overrides)).model
    with torch.device("meta"):
        return cfg, Transformer(cfg)


def hand_count(V, d, L, hidden, mem_layers, n_keys, H, k_dim, v_dim, shared_values=True):
    """Parameters of the decoder, written out from the hyper-parameters (untied, no GQA)."""
    embedding, output, final_norm = V * d, V * d, d
    attention, norms, ffn = 4 * d * d, 2 * d, 3 * d * hidden
    n_mem = len(mem_layers)
    dense = embedding + output + final_norm + L * (attention + norms) + (L - n_mem) * ffn
    values = (1 if shared_values else n_mem) * n_keys**2 * v_dim
    keys = n_mem * 2 * H * n_keys * (k_dim // 2)
    query_proj, query_norm = d * H * k_dim, k_dim // 2
    gate, out = d * v_dim, v_dim * d
    other = n_mem * (query_proj + query_norm + gate + out)
    return dict(dense=dense, memory_values=values, memory_keys=keys, memory_other=other)


def test_memory_373m_parameter_count(repo_root):
    cfg, model = build_on_meta(repo_root / "configs/memory_373m.yaml")
    # the shape of "Memory Layers at Scale"' 373M-class base with memory in three layers
    m = cfg.memory
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads) == (32000, 1024, 24, 16, 16)
    assert (m.layers, m.n_keys, m.heads, m.k, m.k_dim, cfg.value_dim) == ([4, 12, 20], 1024, 4, 32, 512, 1024)
    assert m.shared_values and not cfg.tie_embeddings
    hidden = 2752  # SwiGLU: 8/3 * 1024 = 2730.7, rounded up to a multiple of 32
    want = hand_count(32000, 1024, 24, hidden, [4, 12, 20], 1024, 4, 512, 1024)
    got = count_parameters(model)
    print(f"memory_373m: {got} active={got.active:,} total={got.total:,}")
    assert vars(got) == want
    assert got.memory_values == 1024**3  # one shared 1M x 1024 table
    assert got.active == got.total - got.memory_values
    assert 340e6 < got.dense < 350e6


def test_smf_1p3b_parameter_count(repo_root):
    cfg, model = build_on_meta(repo_root / "configs/smf_1p3b.yaml")
    m = cfg.memory
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads) == (32000, 2048, 22, 16, 16)
    assert (m.layers, m.n_keys, m.heads, m.k, m.k_dim, cfg.value_dim) == ([12], 1024, 4, 32, 512, 1024)
    hidden = 5472  # SwiGLU: 8/3 * 2048 = 5461.3, rounded up to a multiple of 32
    want = hand_count(32000, 2048, 22, hidden, [12], 1024, 4, 512, 1024)
    got = count_parameters(model)
    print(f"smf_1p3b: {got} active={got.active:,} total={got.total:,}")
    assert vars(got) == want
    assert 1.15e9 < got.active < 1.3e9  # the "1.3B" model


def test_unshared_value_tables_are_counted_per_layer(repo_root):
    _, model = build_on_meta(repo_root / "configs/memory_373m.yaml", ["model.memory.shared_values=false"])
    assert count_parameters(model).memory_values == 3 * 1024**3


def test_meta_build_allocates_nothing(repo_root):
    _, model = build_on_meta(repo_root / "configs/smf_1p3b.yaml")
    assert all(p.is_meta for p in model.parameters())


def test_dense_baseline_matches_tiny_active_parameters(repo_root):
    tiny = count_parameters(Transformer(load_config(repo_root / "configs/tiny.yaml").model))
    dense = count_parameters(Transformer(load_config(repo_root / "configs/tiny_dense.yaml").model))
    print(f"tiny active={tiny.active:,} tiny_dense active={dense.active:,}")
    assert dense.memory_values == dense.memory_keys == dense.memory_other == 0
    assert tiny.memory_values > 0
    assert abs(dense.active - tiny.active) <= 1e-3 * tiny.active


def test_tiny_flops_per_token_hand_count(repo_root):
    cfg = load_config(repo_root / "configs/tiny.yaml").model
    V, d, L, S, hidden = 512, 128, 4, 128, 352  # hidden: 8/3 * 128 = 341.3 -> multiple of 32
    H, n_keys, k, k_dim, v = 4, 128, 16, 64, 128
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.hidden_dim, cfg.memory.layers) == (V, d, L, hidden, [2])
    # forward, multiply-add = 2 FLOPs
    attention_proj = L * 2 * 4 * d * d  # wq, wk, wv, wo
    ffn = (L - 1) * 2 * 3 * d * hidden  # three SwiGLU blocks
    output = 2 * d * V
    attention_core = L * (2 * S * d + 2 * S * d)  # QK^T and AV over S positions
    memory = 2 * d * H * k_dim + 2 * H * n_keys * k_dim + 2 * H * k * v + 2 * d * v + 2 * v * d
    want_dense = 3 * (attention_proj + ffn + output + attention_core)  # forward + backward (2x)
    want_memory = 3 * memory
    assert (want_dense, want_memory) == (5_185_536, 638_976)
    got = flops_per_token(cfg, seq_len=S)
    assert got == {"dense": want_dense, "memory": want_memory, "total": want_dense + want_memory}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.n_kv_heads=2", "model.tie_embeddings=true", "model.memory.layers=[0,3]", "model.memory.v_dim=64"],
    ],
)
def test_tiny_flops_match_a_measured_count(repo_root, overrides):
    """torch's FlopCounterMode on a real forward+backward sees every matmul (attention through the
    math backend); the only counted term it cannot see is the embedding bag, not a matmul."""
    cfg = load_config(repo_root / "configs/tiny.yaml", overrides).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, S = 1, 64
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        language_model_loss(model(tokens), tokens).backward()
    m = cfg.memory
    bag = 3 * len(m.layers) * 2 * m.heads * m.k * cfg.value_dim
    assert counter.get_total_flops() / (B * S) == flops_per_token(cfg, S)["total"] - bag


def test_dense_flops_have_no_memory_part(repo_root):
    cfg = load_config(repo_root / "configs/tiny_dense.yaml").model
    got = flops_per_token(cfg, seq_len=64)
    assert got["memory"] == 0 and got["total"] == got["dense"] > 0


def test_each_layer_kind_matches_a_measured_count_of_its_sublayer(repo_root):
    """layer_kinds (what tools/bench_kernels.py --layer divides a step by) per kind: FlopCounterMode
    on one sublayer's forward+backward (input and weight gradients) equals the kind's count; the
    memory layer without its bag, which is no matmul."""
    from pretrain.model import layer_kinds

    cfg = load_config(repo_root / "configs/tiny.yaml").model
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, S = 2, 32
    x = torch.randn(B, S, cfg.dim, requires_grad=True)
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    freqs = model.rotary(S, x.device)
    dense = next(b for b in model.layers if not b.is_memory)
    memory = next(b for b in model.layers if b.is_memory)
    run = {
        "attention": lambda: dense.attention(x, freqs),
        "ffn": lambda: dense.ffn(x),
        "memory": lambda: memory.ffn(x, model.value_table_for(0)),
        "output_head": lambda: language_model_loss(model.output(x), tokens),
    }
    m = cfg.memory
    bag = 3 * 2 * m.heads * m.k * cfg.value_dim
    kinds = layer_kinds(cfg, S)
    assert [k.name for k in kinds] == ["attention", "ffn", "output_head", "memory"]
    assert sum(k.count * k.flops_per_token for k in kinds) == flops_per_token(cfg, S)["total"]
    for kind in kinds:
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            run[kind.name]().sum().backward()
        expected = kind.flops_per_token - (bag if kind.name == "memory" else 0)
        assert counter.get_total_flops() / (B * S) == expected, kind.name


CONFIGS = sorted(p.name for p in (Path(__file__).parents[2] / "configs").glob("*.yaml"))
VARIANTS = [
    ["model.tie_embeddings=true"],
    ["model.n_kv_heads=2", "model.ffn_hidden=200"],
    ["model.memory.qk_norm=false", "model.memory.v_dim=48", "model.memory.k_dim=32"],
    ["model.memory.shared_values=false", "model.memory.layers=[0,3]", "model.memory.heads=2"],
    ["model.memory.layers=[]"],
]


@pytest.mark.parametrize(
    "config, variant",
    [(c, []) for c in CONFIGS] + [(c, v) for c in ("tiny.yaml", "smf_tiny.yaml") for v in VARIANTS],
    ids=lambda x: ",".join(o.split(".", 1)[1] for o in x) if isinstance(x, list) else x,
)
def test_the_config_s_parameter_count_equals_the_built_model_s(repo_root, config, variant):
    """memlayers-submit's run plan built the model on the meta device (importing torch and triton, seconds)
    only to count its parameters; config_parameters counts them from the config. The reference is the
    built model: count_parameters' split, and the numel of its parameters (tied weights once)."""
    cfg, model = build_on_meta(repo_root / "configs" / config, variant)
    counted = config_parameters(cfg)
    assert counted == count_parameters(model)
    assert counted.total == sum(p.numel() for p in model.parameters())
