"""The decoder families' tiny random HF models (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3
text, Phi-3, Qwen3-MoE, Mixtral), one table shared by tests/models/test_decoder.py and the peft
differential harness (tests/parity_harness.py)."""

import torch
import transformers
from peft_checks import perturb

WINDOW = 4
SLIDE = ["sliding_attention", "full_attention", "sliding_attention"]
# family: (HF causal LM class, config class, config kwargs, LoRA targets for the peft checks)
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
              dict(tie_word_embeddings=True, attention_bias=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
              ["q_proj", "v_proj"]),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
              ["q_proj", "k_proj", "down_proj"]),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config,
              dict(head_dim=8, tie_word_embeddings=False), ["q_proj", "v_proj", "o_proj"]),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig,
                dict(sliding_window=WINDOW, head_dim=8), ["q_proj", "v_proj", "gate_proj"]),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config,
               dict(head_dim=8, query_pre_attn_scalar=16, sliding_window=WINDOW,
                    final_logit_softcapping=3.0, attn_logit_softcapping=2.0),
               ["q_proj", "v_proj", "up_proj"]),
    "gemma3_text": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig,
                    dict(head_dim=8, query_pre_attn_scalar=16, sliding_window=WINDOW,
                         layer_types=SLIDE,
                         rope_parameters={"full_attention": {"rope_type": "linear",
                                                             "factor": 2.0, "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default",
                                                                "rope_theta": 1e4}}),
                    ["q_proj", "k_proj", "v_proj"]),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config,
             dict(sliding_window=WINDOW, pad_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                   "partial_rotary_factor": 0.5}),
             ["qkv_proj", "gate_up_proj"]),
    "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
                  dict(head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                       norm_topk_prob=True, use_sliding_window=True, sliding_window=WINDOW),
                  ["q_proj", "v_proj"]),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig,
                dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=WINDOW), ["k_proj", "o_proj"]),
}
TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
            bos_token_id=0, eos_token_id=0, max_position_embeddings=64)


def tiny(name: str, **overrides):
    """The family's tiny random HF model (norm scales and biases drawn, not 0 / 1)."""
    cls, config_cls, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = cls(config_cls(**{**TINY, **kwargs, **overrides})).eval()
    return perturb(model, r"norm|bias$")
