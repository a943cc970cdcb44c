"""The suite's network guard (``tests/_netguard.py``) sees and refuses lookups of any host but this machine."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests import _netguard
from tests.conftest import BASE_REPO


def test_loopback_is_allowed_and_other_hosts_are_refused_and_recorded(hub):
    assert _netguard.allowed("127.0.0.1") and _netguard.allowed("::1") and _netguard.allowed("localhost")
    assert not _netguard.allowed("huggingface.co") and not _netguard.allowed("8.8.8.8")
    socket.getaddrinfo("127.0.0.1", 80)
    with socket.create_connection(("127.0.0.1", int(hub.url.rsplit(":", 1)[1])), timeout=5):
        pass
    with pytest.raises(OSError):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(OSError), socket.socket() as sock:
        sock.connect(("8.8.8.8", 443))
    attempts = _netguard.take()  # taken here, so that this test itself passes
    assert len(attempts) == 2
    assert "huggingface.co" in attempts[0] and "8.8.8.8" in attempts[1]


def test_a_child_process_is_guarded_too():
    code = "import socket\ntry:\n    socket.getaddrinfo('huggingface.co', 443)\nexcept OSError:\n    print('refused')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout.strip() == "refused", proc.stderr
    attempts = _netguard.take()
    assert len(attempts) == 1 and "huggingface.co" in attempts[0] and "child process" in attempts[0]


def test_peft_save_with_auto_embedding_layers_is_caught(tiny_base, tmp_path):
    """What the guard exists for: PEFT's default ``save_embedding_layers="auto"`` asks huggingface.co for the
    base model's config.json (the code passes ``save_embedding_layers=False`` everywhere)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = BASE_REPO
    model.save_pretrained(tmp_path / "quiet", save_embedding_layers=False)
    assert _netguard.take() == []
    with pytest.warns(UserWarning):  # PEFT swallows the refused connection and warns
        model.save_pretrained(tmp_path / "auto")
    attempts = _netguard.take()
    assert attempts and "huggingface.co" in attempts[0]
