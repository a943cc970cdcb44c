"""Cards as the Space and the Hub show them: the expert model card and the registry card with its plots."""

from __future__ import annotations

import re

import httpx
import pytest
from huggingface_hub import DatasetCard, ModelCard, hf_hub_download

from moin_hub import Registry, errors, push_expert
from moin_hub.hub.cards import change_cell, example_prompt, expert_card, plot_title, registry_card
from moin_hub.hub.registry_plots import publish_plots


@pytest.fixture
def two_experts(hub, registry_id, make_expert) -> Registry:
    for topic in ("cooking", "astronomy"):
        push_expert(make_expert(topic), registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-card-{topic}",
                    endpoint=hub.url)
    return Registry.load(registry_id, endpoint=hub.url)


def _tables_follow_blank_lines(text: str) -> bool:
    lines = text.splitlines()
    return all(not lines[i - 1].strip() or lines[i - 1].startswith("|")
               for i, line in enumerate(lines) if i and line.startswith("|"))


def test_expert_card_shows_keywords_samples_perplexity_and_usage(hub, two_experts):
    record = two_experts.get("cooking")
    card = expert_card(record, two_experts.manifest, registry_id=two_experts.registry_id, endpoint=hub.url,
                       samples=['Knead the "bread" dough for $10 `now`.', "Simmer the sauce."], eval_tokens=321)
    text = str(card)
    assert "\n\n\n" not in text and _tables_follow_blank_lines(text)
    assert "**Keywords:** cooking, knead, the, bread" in text
    assert "> Knead the" in text and "> Simmer the sauce." in text
    assert "| Base model | 14.25 |" in text and "| This expert | 10.50 |" in text and "| Change | -26.3% |" in text
    assert "(321 tokens; lower is better)" in text
    # copy-paste usage: plain PEFT (with generation), moin-hub CLI and Python, and the Space
    assert f'PeftModel.from_pretrained(base, "{record.repo_id}")' in text and "model.generate(" in text
    assert f"moin-hub pull --registry {two_experts.registry_id} --query" in text
    assert "moin_hub.load_expert(result, return_tokenizer=True)" in text
    assert f"moin-hub space --registry {two_experts.registry_id}" in text
    prompts = re.findall(r'--query "([^"]*)"', text)
    assert prompts and all(not set(p) & set('"$`\\') for p in prompts)  # safe inside the snippets' quotes
    parsed = ModelCard(text)
    assert parsed.data.library_name == "peft" and parsed.data.base_model == two_experts.manifest.base_model.repo_id


def test_registry_card_table_change_bars_and_plots(hub, two_experts):
    text = str(registry_card(two_experts.manifest, list(two_experts.experts), registry_id=two_experts.registry_id,
                             endpoint=hub.url, plots=["plots/topic_map.png"]))
    assert "\n\n\n" not in text and _tables_follow_blank_lines(text)
    assert "| Expert | Keywords | Docs | Perplexity base → expert | Change | Size | Commit |" in text
    assert "14.25 → 10.50 | -26.3% █████ |" in text
    assert "## Plots" in text
    assert f"![Topic map]({hub.url}/datasets/{two_experts.registry_id}/resolve/main/plots/topic_map.png)" in text
    assert f"moin-hub space --registry {two_experts.registry_id}" in text
    assert DatasetCard(text).data.configs[0]["data_files"][0]["path"] == "data/*.parquet"  # format v2 shards
    plain = str(registry_card(two_experts.manifest, [], registry_id=two_experts.registry_id, endpoint=hub.url))
    assert "## Plots" not in plain and "No experts yet" in plain and "\n\n\n" not in plain


def test_card_helpers():
    assert change_cell(40.0, 50.0) == ("-20.0% ████", -20.0)
    assert change_cell(55.0, 50.0) == ("+10.0%", 10.0)
    assert change_cell(None, 50.0) == ("n/a", None) and change_cell(40.0, None) == ("n/a", None)
    assert plot_title("plots/perplexity_per_expert.png") == "Perplexity per expert"
    assert example_prompt([], ["bread", "oven"]) == "Tell me about bread, oven"
    assert example_prompt(["  "], []) == "Tell me about this topic"


def test_publish_plots_puts_images_in_the_registry_and_its_card(hub, api, two_experts, tmp_path):
    plots = tmp_path / "plots"
    plots.mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    (plots / "topic_map.png").write_bytes(png)
    (plots / "perplexity_per_expert.png").write_bytes(png)
    (plots / "notes.txt").write_text("not a plot")
    sha = publish_plots(two_experts.registry_id, plots, endpoint=hub.url)
    files = set(api.list_repo_files(two_experts.registry_id, repo_type="dataset", revision=sha))
    assert {"plots/topic_map.png", "plots/perplexity_per_expert.png", "README.md"} <= files
    assert "plots/notes.txt" not in files
    readme = hf_hub_download(two_experts.registry_id, "README.md", repo_type="dataset", revision=sha,
                             endpoint=hub.url)
    text = open(readme, encoding="utf-8").read()
    assert "## Plots" in text and "![Perplexity per expert](" in text and "cooking" in text
    # the card's image URL is served by the Hub
    url = re.search(r"!\[Topic map\]\(([^)]+)\)", text).group(1)
    assert httpx.get(url, follow_redirects=True).content == png
    # the rows are untouched
    assert sorted(r.expert_id for r in Registry.load(two_experts.registry_id, endpoint=hub.url)) == ["astronomy",
                                                                                                       "cooking"]


def test_publish_plots_refuses_non_images(hub, registry_id, tmp_path):
    bad = tmp_path / "model.pkl"
    bad.write_bytes(b"pickle")
    with pytest.raises(errors.UnsafeFileError, match="image"):
        publish_plots(registry_id, [bad], endpoint=hub.url)
    with pytest.raises(errors.MoinHubError, match="not found"):
        publish_plots(registry_id, [tmp_path / "missing.png"], endpoint=hub.url)
