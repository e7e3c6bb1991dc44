"""Running the real `lora-jax` command in a subprocess, and what the CLI tests check of it."""

import hashlib
import json
import os
import subprocess
import sys

ENV = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # as tests/conftest.py sets


def lora_jax_cli(*args, timeout=300):
    """(exit status, stdout, stderr) of `python -m lora_jax ARGS`."""
    proc = subprocess.run([sys.executable, "-m", "lora_jax", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    return proc.returncode, proc.stdout, proc.stderr


def error_line(err):
    """The one `lora-jax` error line (library log lines, if any, are not ours)."""
    lines = [line for line in err.splitlines() if line.startswith("lora-jax")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_json(path):
    def bad(constant):
        raise AssertionError(f"{path} holds bare {constant}")
    return json.loads(path.read_text(), parse_constant=bad)


def transformers_continuation(folder, prompt, new_tokens, seq2seq=False):
    """What `lora-jax generate` prints, computed with transformers' greedy generate on the
    merged HF folder."""
    import torch
    import transformers

    from lora_jax.models import load_tokenizer
    from lora_jax.train.data import unpadded_tokenizer

    tok = load_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
    eos = tok.token_to_id("[SEP]")  # the MiniLM tokenizer's end of text, as lora-jax picks it
    ids = unpadded_tokenizer(tok).encode(prompt, add_special_tokens=seq2seq).ids
    kw = {"decoder_start_token_id": 0} if seq2seq else {}
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos, **kw)[0].tolist()
    new = out[1:] if seq2seq else out[len(ids):]
    new = new[: new.index(eos)] if eos in new else new
    if seq2seq:
        return tok.decode(new)
    prefix, whole = tok.decode(ids), tok.decode(ids + new)
    return prompt + whole[len(prefix):]
