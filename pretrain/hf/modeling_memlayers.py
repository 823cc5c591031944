"""A memlayers decoder (RMSNorm, RoPE, SDPA attention, SwiGLU, Memory+ product-key
memory layers) for Hugging Face transformers, in plain torch.

Self-contained: an independent implementation of the training model's forward that
imports torch and transformers only, reading the same weight names as
`pretrain.model.Transformer.state_dict()`.

Inference follows transformers' conventions: a `Cache` (DynamicCache by default) holds
every layer's rotated keys and values, so `generate()` feeds only the new tokens and each
token's memory lookup runs once. Batches may be left-padded: the 2-D `attention_mask`
hides padding from attention and `position_ids` (from the mask when not given) start at
0 on each row's first real token, so a padded row computes what it computes alone.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_memlayers import MemlayersConfig


def rotary_table(head_dim, max_seq_len, theta):
    """(max_seq_len, head_dim // 2, 2) cos/sin of position * theta^(-2i / head_dim)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rotate(x, table):
    """Rotate consecutive pairs of x (B, S, heads, head_dim) by the angles of table (B or 1, S, head_dim // 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size, eps, affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size)) if affine else None

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.heads, self.kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x, table, mask, cache, layer_index):
        """mask: None (plain causal over x alone), or bool (B, 1, S, past + S), True = may attend."""
        B, S, _ = x.shape
        q = rotate(self.wq(x).view(B, S, self.heads, self.head_dim), table).transpose(1, 2)
        k = rotate(self.wk(x).view(B, S, self.kv_heads, self.head_dim), table).transpose(1, 2)
        v = self.wv(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer_index)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ValueTable(nn.Module):
    def __init__(self, num_slots, v_dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_slots, v_dim))


class MemoryPlus(nn.Module):
    """out = out_proj(sum_j w_j * values[slot_j] * silu(gate_proj(x))), slots from product keys."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.heads, self.k, self.k_dim, self.n_keys = c.memory_heads, c.memory_k, c.memory_k_dim, c.memory_n_keys
        self.v_dim, self.qk_norm = c.memory_v_dim, c.memory_qk_norm
        half = self.k_dim // 2
        self.query_proj = nn.Linear(c.dim, self.heads * self.k_dim, bias=False)
        if self.qk_norm:
            self.query_norm = RMSNorm(half, c.norm_eps)
        self.keys1 = nn.Parameter(torch.zeros(self.heads, self.n_keys, half))
        self.keys2 = nn.Parameter(torch.zeros(self.heads, self.n_keys, half))
        self.gate_proj = nn.Linear(c.dim, self.v_dim, bias=False)
        self.out_proj = nn.Linear(self.v_dim, c.dim, bias=False)

    def select(self, x):
        """(weights, slots), each (tokens, heads, k), for x (B, S, dim)."""
        half = self.k_dim // 2
        q = self.query_proj(x).reshape(-1, self.heads, 2, half)
        keys1, keys2 = self.keys1, self.keys2
        if self.qk_norm:
            q = self.query_norm(q)
            keys1 = F.rms_norm(keys1, (half,))
            keys2 = F.rms_norm(keys2, (half,))
        keys1, keys2 = keys1.to(q.dtype), keys2.to(q.dtype)
        scores1 = torch.einsum("thd,hnd->thn", q[:, :, 0], keys1)  # (T, heads, n_keys)
        scores2 = torch.einsum("thd,hnd->thn", q[:, :, 1], keys2)
        best1, idx1 = scores1.topk(self.k, dim=-1)
        best2, idx2 = scores2.topk(self.k, dim=-1)
        pairs = (best1[..., :, None] + best2[..., None, :]).flatten(-2)  # (T, heads, k * k)
        scores, flat = pairs.topk(self.k, dim=-1)
        slots = idx1.gather(-1, flat // self.k) * self.n_keys + idx2.gather(-1, flat % self.k)
        weights = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)
        return weights, slots

    def forward(self, x, values):
        weights, slots = self.select(x)
        T = slots.shape[0]
        table = values.weight
        rows, compute = slots.reshape(T, -1), table
        if table.dtype in (torch.bfloat16, torch.float16):
            # the bag sums in fp32. A lookup of fewer entries than half the pool (decoding) upcasts
            # only the rows it reads, gathered in bag order (a shape a compiled graph holds, as it
            # cannot hold unique's): a fp32 copy of a 1M-slot pool per lookup made decoding ~70x
            # slower. Same sums bit for bit either way.
            if 2 * rows.numel() < table.shape[0]:
                compute = table[rows.flatten()].float()
                rows = torch.arange(rows.numel(), device=rows.device).view_as(rows)
            else:
                compute = table.float()
        bag = F.embedding_bag(rows, compute, per_sample_weights=weights.reshape(T, -1).to(compute.dtype), mode="sum")
        bag = bag.to(table.dtype).reshape(*x.shape[:-1], self.v_dim).to(x.dtype)
        return self.out_proj(bag * F.silu(self.gate_proj(x)))


class Block(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.is_memory = index in config.memory_layers
        self.ffn = MemoryPlus(config) if self.is_memory else FeedForward(config.dim, config.ffn_hidden)

    def forward(self, x, table, values, mask=None, cache=None, layer_index=0):
        x = x + self.attention(self.attention_norm(x), table, mask, cache, layer_index)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, values) if self.is_memory else self.ffn(h))


class MemlayersPreTrainedModel(PreTrainedModel):
    config_class = MemlayersConfig
    base_model_prefix = "memlayers"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        # Every weight comes from model.safetensors; this only gives fresh models finite values.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


class MemlayersForCausalLM(MemlayersPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        c = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        num_slots = c.memory_n_keys * c.memory_n_keys
        self.values = nn.ModuleList(ValueTable(num_slots, c.memory_v_dim) for _ in range(c.num_value_tables))
        self._rotary = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, refusing a checkpoint that lacks weights (see check_loaded_weights)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loaded_weights(info, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return (model, info) if want_info else model

    def _validate_generated_length(self, generation_config, input_ids_length, *args, **kwargs):
        """transformers' own checks, then refuse a generate() call whose prompt and new tokens
        cannot fit max_seq_len before any token is computed (forward() alone raised at the step
        that overflowed, the work so far lost). transformers' models only warn past
        max_position_embeddings and go on; this model's rotary table ends at max_seq_len."""
        super()._validate_generated_length(generation_config, input_ids_length, *args, **kwargs)
        check_generation_length(input_ids_length, generation_config.max_length, self.config.max_seq_len)

    def get_input_embeddings(self):
        return self.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def rotary(self, positions):
        """Angles for positions (B or 1, S) -> (B or 1, S, head_dim // 2, 2)."""
        if self._rotary is None or self._rotary.device != positions.device:
            c = self.config
            self._rotary = rotary_table(c.head_dim, c.max_seq_len, c.rope_theta).to(positions.device)
        return self._rotary[positions]

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        labels=None,
        return_dict=None,
        past_key_values=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """Logits for input_ids (B, S), continuing `cache` (its keys/values are extended in place).

        attention_mask (B, past + S), 1 = real token, may mark left padding; position_ids (B, S)
        default to the count of real tokens before each one.
        """
        if input_ids is None:
            raise ValueError("MemlayersForCausalLM needs input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and getattr(cache, "is_compileable", False):
            # a static cache returns its whole preallocated buffer and needs cache_position and 4-D masks
            raise ValueError(
                f"MemlayersForCausalLM keeps keys and values in a DynamicCache (the default), not a "
                f"{type(cache).__name__}: leave generate()'s cache_implementation unset (or 'dynamic')"
            )
        B, S = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        limit = self.config.max_seq_len
        if past + S > limit:
            raise ValueError(
                f"sequence length {past + S} (cached {past} + new {S}) exceeds the model's "
                f"max_seq_len={limit}: shorten the prompt or lower max_new_tokens"
            )
        if attention_mask is not None and attention_mask.shape != (B, past + S):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + S)} "
                "(one entry per cached and new token)"
            )
        compiling = torch.compiler.is_compiling()
        # Whether a mask hides any token is known only from its values: a compiled graph cannot
        # branch on them (torch.compile(fullgraph=True) refused the guard), so it takes the padded
        # path for any mask, which for a mask of ones gives the same positions and attends to the
        # same keys. Eager keeps the check: an unpadded batch then runs SDPA's causal kernels.
        padded = attention_mask is not None and (compiling or not bool(attention_mask.bool().all()))
        if position_ids is None:
            if padded:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + S, device=input_ids.device)[None]
        elif compiling:  # positions derived above are below past + S <= limit; given ones are checked
            torch._assert_async((position_ids < limit).all(), f"a position exceeds max_seq_len={limit}")
        elif int(position_ids.max()) >= limit:
            raise ValueError(f"position {int(position_ids.max())} exceeds the model's max_seq_len={limit}")
        mask = None
        if padded or (past > 0 and S > 1):
            query = torch.arange(past, past + S, device=input_ids.device)[:, None]
            key = torch.arange(past + S, device=input_ids.device)[None, :]
            mask = (key <= query)[None, None].expand(B, 1, S, past + S)
            if padded:
                # a padding query still sees itself: no all-masked row (NaN) enters the cache
                mask = (mask & attention_mask.bool()[:, None, None, :]) | (key == query)[None, None]
        x = self.tok_embeddings(input_ids)
        table = self.rotary(position_ids)
        memory_index = 0
        for layer_index, block in enumerate(self.layers):
            values = None
            if block.is_memory:
                values = self.values[0 if self.config.memory_shared_values else memory_index]
                memory_index += 1
            x = block(x, table, values, mask, cache, layer_index)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.output(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def check_generation_length(prompt_length: int, max_length: int, max_seq_len: int) -> None:
    """Raise when generating up to `max_length` tokens (prompt included; the last new token is
    never fed back, so max_seq_len + 1 fit) from a prompt of `prompt_length` tokens (a padded
    batch's width) would feed the model more than max_seq_len tokens."""
    if max_length is None or max_length <= max_seq_len + 1:
        return
    new = max_length - prompt_length
    fixes = []
    if new <= max_seq_len:
        fixes.append(f"shorten the prompt to at most {max_seq_len + 1 - new} tokens (keep its end)")
    if prompt_length <= max_seq_len:
        fixes.append(f"lower max_new_tokens to at most {max_seq_len + 1 - prompt_length}")
    fix = " or ".join(fixes) or f"make prompt + max_new_tokens at most {max_seq_len + 1}"
    raise ValueError(
        f"generate(): the prompt is {prompt_length} tokens (input_ids' width, padding included) and "
        f"{new} new tokens were asked for (max_length {max_length}), but the model's max_seq_len is "
        f"{max_seq_len}: prompt + new tokens may be at most {max_seq_len + 1}; {fix}"
    )


def check_loaded_weights(info: dict, source) -> None:
    """transformers only warns when model.safetensors lacks a weight (it stays randomly
    initialised, so the logits are silently wrong) or holds one the model has not (config.json
    edited or from another export: a layer silently dropped): raise instead, naming the weights."""
    missing = sorted(info.get("missing_keys") or [])
    extra = sorted(info.get("unexpected_keys") or [])
    mismatched = [f"{name} (file {tuple(a)}, model {tuple(b)})" for name, a, b in info.get("mismatched_keys") or []]
    problems = [
        f"{label} {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        for label, names in (("missing", missing), ("not in the model", extra), ("wrong shape", mismatched))
        if names
    ]
    if problems:
        raise ValueError(
            f"{source}/model.safetensors does not hold the weights of the model its config.json describes "
            f"({'; '.join(problems)}): re-export the checkpoint with tools/export.py"
        )
