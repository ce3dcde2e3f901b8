"""The DeepSpeed-Inference tutorial's two examples with `deepspeed` replaced by `dsinfer`,
on tiny random models with real tokenizers (no hub). Run under the launcher.

usage: seed_examples.py {t5|gptneo} OUT_JSON TOKENIZER_DIR"""
import json
import os
import sys

import torch
import transformers as tf
from transformers import pipeline
from transformers.models.t5.modeling_t5 import T5Block

import dsinfer

local_rank = int(os.getenv("LOCAL_RANK", "0"))
world_size = int(os.getenv("WORLD_SIZE", "1"))
device = local_rank if torch.cuda.is_available() else -1
which, out, tok_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
tok = tf.AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)

if which == "t5":
    config = tf.T5Config(vocab_size=len(tok), d_model=64, d_kv=8, d_ff=128, num_layers=2,
                         num_heads=4, decoder_start_token_id=tok.pad_token_id,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    model = tf.T5ForConditionalGeneration(config).eval()
    x = tok(["Is this review positive or negative?", "It was fine"], return_tensors="pt",
            padding=True, return_token_type_ids=False)
    want = model.generate(**x, max_new_tokens=12, do_sample=False)
    twin = tf.T5ForConditionalGeneration(config).eval()
    twin.load_state_dict(model.state_dict())
    # transformers 5 removed the text2text-generation pipeline; the model is what the seed shards
    engine = dsinfer.init_inference(
        twin, mp_size=world_size, dtype=torch.float,
        injection_policy={T5Block: ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo")})
    got = engine.module.generate(**x, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        a = model(**x, decoder_input_ids=want).logits
        b = engine.module(**x, decoder_input_ids=want).logits
    result = {"same_ids": torch.equal(got, want), "ids": got.tolist(),
              "rel_err": ((a - b).abs().max() / a.abs().max()).item()}
else:
    config = tf.GPTNeoConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4,
                             attention_types=[[["global", "local"], 1]], window_size=16,
                             max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
    generator = pipeline("text-generation", model=tf.GPTNeoForCausalLM(config).eval(),
                         tokenizer=tok, device=device)
    generator.model = dsinfer.init_inference(generator.model, mp_size=world_size,
                                             dtype=torch.float, replace_method="auto",
                                             replace_with_kernel_inject=True)
    string = generator("DeepSpeed is", do_sample=True, min_length=50)
    result = {"text": string[0]["generated_text"]}

with open(f"{out}.rank{os.environ.get('RANK', '0')}", "w") as f:
    json.dump(result, f)
