"""The shipped fact set, the pre-edit filter and the ZsRE export (offline; no real model).

The builder is tested on a tiny Llama whose weights are set by hand so that it is a bigram model:
attention and MLP outputs are zeroed (the residual stream is the token embedding), embeddings are
one-hot, and ``lm_head`` maps each chosen token to the next one. Every score below follows from the
map by hand.
"""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch

from odedit_hf.data.errors import DataValidationError
from odedit_hf.data.facts import (
    DEFAULT_PROMPT_FORMAT,
    FACT_FIELDS,
    PREFILL_INSTRUCTION,
    ZSRE_FIELDS,
    Fact,
    build_fact_benchmark,
    fact_prompts,
    load_facts,
    shipped_facts_path,
    to_zsre_record,
    validate_facts,
)

# ------------------------------------------------------------------------------------ shipped file


@pytest.fixture(scope="module")
def shipped():
    return load_facts()


def test_shipped_records_have_exactly_the_fields():
    with open(shipped_facts_path(), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert len(records) >= 300
    for record in records:
        assert tuple(record) == FACT_FIELDS


def test_shipped_set_is_unique_and_counterfactuals_are_answers_of_the_relation(shipped):
    ids = [f.id for f in shipped]
    prompts = [f.prompt for f in shipped]
    assert len(set(ids)) == len(ids)
    assert len(set(prompts)) == len(prompts)
    answers = collections.defaultdict(set)
    for f in shipped:
        answers[f.relation].add(f.answer)
    for f in shipped:
        assert f.counterfactual != f.answer, f.id
        assert f.counterfactual in answers[f.relation] - {f.answer}, f.id
        assert 1 <= len(f.paraphrases) <= 2 and f.prompt not in f.paraphrases, f.id


def test_shipped_relations_are_consistent(shipped):
    """Each relation has one prompt template and one paraphrase template per slot, at least 30 facts and
    5 distinct answers; locality facts are of another relation and another subject."""
    by_relation = collections.defaultdict(list)
    for f in shipped:
        by_relation[f.relation].append(f)
    assert len(by_relation) >= 6

    def template(prompt: str, subject: str) -> str:
        assert subject in prompt
        return re.sub(r"(?i)\bthe \{\}", "{}", prompt.replace(subject, "{}", 1)).lower()

    for relation, facts in by_relation.items():
        assert len(facts) >= 30, relation
        assert len({f.answer for f in facts}) >= 5, relation
        assert len({template(f.prompt, f.subject) for f in facts}) == 1, relation
        for slot in range(max(len(f.paraphrases) for f in facts)):
            assert len({template(f.paraphrases[slot], f.subject) for f in facts}) == 1, (relation, slot)
    ids = {f.id: f for f in shipped}
    for f in shipped:
        loc = ids[f.locality_id]
        assert loc.relation != f.relation and loc.subject != f.subject
        assert (loc.prompt, loc.answer) == (f.locality_prompt, f.locality_answer)
        assert f.locality_answer not in (f.answer, f.counterfactual)


def test_load_facts_filters_relations(shipped):
    capitals = load_facts(relations=["capital"])
    assert capitals and {f.relation for f in capitals} == {"capital"}
    assert len(capitals) == sum(f.relation == "capital" for f in shipped)
    with pytest.raises(ValueError, match="unknown relations"):
        load_facts(relations=["no_such_relation"])


# --------------------------------------------------------------------------------- validation errors


def _record(**overrides):
    base = {
        "id": "capital/france",
        "relation": "capital",
        "subject": "France",
        "prompt": "The capital of France is",
        "answer": "Paris",
        "counterfactual": "Rome",
        "paraphrases": ["The capital city of France is"],
        "locality_id": "author/hamlet",
        "locality_prompt": "Hamlet was written by",
        "locality_answer": "William Shakespeare",
    }
    return {**base, **overrides}


def _write(tmp_path, records):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"counterfactual": "Paris"}, "counterfactual", "equals the true answer"),
        ({"subject": "Spain"}, "prompt", "does not occur"),
        ({"paraphrases": []}, "paraphrases", "one or two"),
        ({"paraphrases": ["The capital of France is"]}, "paraphrases", "differ from the prompt"),
        ({"answer": " Paris"}, "answer", "surrounding spaces"),
        ({"locality_answer": "Rome"}, "locality_answer", "equals this fact's answer"),
        ({"id": "author/france"}, "id", "must start with the relation"),
    ],
)
def test_bad_record_names_file_record_and_field(tmp_path, overrides, field, message):
    path = _write(tmp_path, [_record(**overrides)])
    with pytest.raises(DataValidationError, match=message) as info:
        load_facts(path)
    assert info.value.field == field and info.value.index == 0 and info.value.path == str(path)


def test_unknown_field_and_bad_json_are_rejected(tmp_path):
    with pytest.raises(DataValidationError, match="unknown fields"):
        load_facts(_write(tmp_path, [_record(extra="x")]))
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_record()) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match="not valid JSON") as info:
        load_facts(path)
    assert info.value.index == 1


def test_set_level_checks():
    facts = [Fact.from_record(r) for r in _TINY_FACTS]
    validate_facts(facts)  # the tiny set below is valid
    with pytest.raises(DataValidationError, match="duplicate id"):
        validate_facts([*facts, facts[0]])
    stray = Fact.from_record({**_TINY_FACTS[0], "counterfactual": "Madrid"})
    with pytest.raises(DataValidationError, match="no answer of relation"):
        validate_facts([stray, *facts[1:]])
    wrong_loc = Fact.from_record({**_TINY_FACTS[0], "locality_prompt": "Emma was written by"})
    with pytest.raises(DataValidationError, match="differ from the prompt/answer"):
        validate_facts([wrong_loc, *facts[1:]])
    same_relation = Fact.from_record({**_TINY_FACTS[0], "locality_id": "capital/italy"})
    with pytest.raises(DataValidationError, match="shares the relation or the subject"):
        validate_facts([same_relation, *facts[1:]])


# ------------------------------------------------------------------------- builder on a bigram Llama


def _fact(fid, subject, prompt, answer, cf, para, loc):
    return {
        "id": fid,
        "relation": fid.split("/")[0],
        "subject": subject,
        "prompt": prompt,
        "answer": answer,
        "counterfactual": cf,
        "paraphrases": [para],
        "locality_id": loc[0],
        "locality_prompt": loc[1],
        "locality_answer": loc[2],
    }


_HAMLET = ("author/hamlet", "Hamlet was written by", "William Shakespeare")
_FRANCE = ("capital/france", "The capital of France is", "Paris")
_ITALY = ("capital/italy", "The capital of Italy is", "Rome")
_TINY_FACTS = [
    _fact("capital/france", "France", *_FRANCE[1:], "Rome", "The capital city of France is", _HAMLET),
    _fact("capital/italy", "Italy", *_ITALY[1:], "Paris", "The capital city of Italy is", _HAMLET),
    _fact("author/hamlet", "Hamlet", *_HAMLET[1:], "Jane Austen", "The author of Hamlet is", _FRANCE),
    _fact(
        "author/songs_of_innocence",
        "Songs of Innocence",
        "Songs of Innocence was written by",
        "William Blake",
        "William Shakespeare",
        "The author of Songs of Innocence is",
        _ITALY,
    ),
    _fact(
        "author/emma",
        "Emma",
        "Emma was written by",
        "Jane Austen",
        "William Blake",
        "The author of Emma is",
        _FRANCE,
    ),
]
# next-token map of the bigram model: "is" -> "Paris", "by" -> "William", "William" -> "Shakespeare"
_BIGRAMS = {"is": "Paris", "by": "William", "William": "Shakespeare"}
# hand-checked (token accuracy) per fact: answer, counterfactual, paraphrase, locality
_EXPECTED = {
    "capital/france": (1.0, 0.0, 1.0, 1.0),  # Paris / Rome / Paris / William Shakespeare
    "capital/italy": (0.0, 1.0, 0.0, 1.0),  # Rome / Paris (the model's belief) / Rome / William Shakespeare
    "author/hamlet": (1.0, 0.0, 0.5, 1.0),  # "is" -> Paris, not William; then William -> Shakespeare
    "author/songs_of_innocence": (0.5, 1.0, 0.0, 0.0),  # William then Shakespeare, not Blake
    "author/emma": (0.0, 0.5, 0.0, 1.0),  # Jane Austen never predicted; cf William Blake: 1 of 2
}


@pytest.fixture(scope="module")
def bigram_model_dir(tmp_path_factory):
    from odedit_hf.testing.tiny import tiny_backbone

    words = [w for f in _TINY_FACTS for key in ("prompt", "answer", "counterfactual") for w in [f[key]]]
    words += [p for f in _TINY_FACTS for p in f["paraphrases"]]
    hidden = 128
    backbone = tiny_backbone(
        "llama",
        texts=words,
        chat_template=True,  # the raw format must switch it off
        text_config={"hidden_size": hidden, "intermediate_size": 64, "num_attention_heads": 4},
    )
    model, tok = backbone.model, backbone.tokenizer
    vocab = model.config.vocab_size
    assert vocab <= hidden, "one-hot embeddings need hidden_size >= vocabulary"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab].copy_(torch.eye(vocab))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for src, dst in _BIGRAMS.items():
            (a,) = tok(src, add_special_tokens=False)["input_ids"]
            (b,) = tok(dst, add_special_tokens=False)["input_ids"]
            model.lm_head.weight[b, a] = 1.0
    folder = tmp_path_factory.mktemp("bigram-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_facts():
    facts = [Fact.from_record(r) for r in _TINY_FACTS]
    validate_facts(facts)
    return facts


def test_builder_keeps_exactly_the_known_facts(bigram_model_dir, tiny_facts, tmp_path):
    out = tmp_path / "bench" / "zsre.json"
    result = build_fact_benchmark(bigram_model_dir, out, facts=tiny_facts)
    assert result.threshold == 1.0 and result.prompt_format == DEFAULT_PROMPT_FORMAT == "raw"
    assert result.kept_ids == ["capital/france", "author/hamlet"]
    assert (result.n_facts, result.n_kept) == (5, 2) and result.kept_fraction == pytest.approx(0.4)
    assert result.per_relation == {"capital": {"facts": 2, "kept": 1}, "author": {"facts": 3, "kept": 1}}
    for score in result.scores:
        got = (score.answer[0], score.counterfactual[0], score.paraphrase[0], score.locality[0])
        assert got == pytest.approx(_EXPECTED[score.fact_id]), score.fact_id
    assert result.means["all/counterfactual_acc"] == pytest.approx(2.5 / 5)
    assert result.means["kept/counterfactual_acc"] == pytest.approx(0.0)
    assert result.means["kept/answer_em"] == pytest.approx(1.0)
    records = json.loads(out.read_text(encoding="utf-8"))
    assert [r["prompt"] for r in records] == ["The capital of France is", "Hamlet was written by"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["zsre.json"]  # no temporary file left


def test_builder_threshold_keeps_partial_answers(bigram_model_dir, tiny_facts, tmp_path):
    result = build_fact_benchmark(bigram_model_dir, tmp_path / "z.json", facts=tiny_facts, threshold=0.5)
    assert result.kept_ids == ["capital/france", "author/hamlet", "author/songs_of_innocence"]
    for bad in (0.0, 1.5, True, "1"):
        with pytest.raises(ValueError, match="threshold"):
            build_fact_benchmark(bigram_model_dir, tmp_path / "x.json", facts=tiny_facts, threshold=bad)


def test_chat_format_scores_through_the_template(bigram_model_dir, tiny_facts, tmp_path):
    """Through the chat template the answer follows "ASSISTANT:", not "is"/"by": the bigram model has
    no mapping for it, so nothing is kept."""
    result = build_fact_benchmark(
        bigram_model_dir, tmp_path / "c.json", facts=tiny_facts, prompt_format="chat"
    )
    assert result.n_kept == 0 and result.prompt_format == "chat"
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == []


def test_zsre_export_layout(tiny_facts):
    record = to_zsre_record(tiny_facts[0])
    assert tuple(record) == ZSRE_FIELDS
    assert record == {
        "prompt": "The capital of France is",
        "target_new": "Rome",
        "ground_truth": "Paris",
        "rephrase_prompt": "The capital city of France is",
        "locality_prompt": "Hamlet was written by",
        "locality_ground_truth": "William Shakespeare",
        "subject": "France",
    }
    assert all(isinstance(v, str) and v for v in record.values())


def test_prompt_formats_render_as_documented():
    from odedit_hf.testing.tiny import tiny_backbone

    chat = tiny_backbone("llama", chat_template=True)
    raw = fact_prompts(chat.model, chat.tokenizer, "raw")
    assert not raw.backbone.uses_chat_template and chat.tokenizer.chat_template  # the caller's is untouched
    sample = raw.sample("The capital of France is", "Paris")
    assert raw.backbone.wrap_prompt(sample) == "The capital of France is"
    assert raw.backbone.wrap_target(sample) == " Paris"

    templated = fact_prompts(chat.model, chat.tokenizer, "chat")
    sample = templated.sample("The capital of France is", "Paris")
    assert templated.backbone.uses_chat_template and templated.prefix == ""
    assert templated.backbone.wrap_prompt(sample) == "USER: The capital of France is ASSISTANT:"
    assert templated.backbone.wrap_target(sample) == "Paris"

    prefill = fact_prompts(chat.model, chat.tokenizer, "chat_prefill")
    sample = prefill.sample("The capital of France is", "Paris")
    assert not prefill.backbone.uses_chat_template
    assert (
        prefill.backbone.wrap_prompt(sample)
        == f"USER: {PREFILL_INSTRUCTION} ASSISTANT:The capital of France is"
    )
    assert prefill.backbone.wrap_target(sample) == " Paris"

    plain = tiny_backbone("llama", chat_template=False)
    for fmt in ("chat", "chat_prefill"):
        with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
            fact_prompts(plain.model, plain.tokenizer, fmt)
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        fact_prompts(plain.model, plain.tokenizer, "json")


def test_score_facts_can_score_the_answer_alone(bigram_model_dir, tiny_facts):
    from odedit_hf.data.facts import load_fact_prompts, score_facts

    prompts = load_fact_prompts(bigram_model_dir)
    scores = score_facts(prompts, tiny_facts, kinds=("answer",), batch_size=2)
    assert [s.answer[0] for s in scores] == [_EXPECTED[f.id][0] for f in tiny_facts]
    assert all(s.counterfactual is None and s.paraphrase is None and s.locality is None for s in scores)
    for bad in ((), ("answers",), "answer"):
        with pytest.raises(ValueError, match="kinds"):
            score_facts(prompts, tiny_facts, kinds=bad)
    with pytest.raises(ValueError, match="batch_size"):
        score_facts(prompts, tiny_facts, batch_size=0)
