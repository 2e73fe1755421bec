"""`--reward-model`: a sequence-classification model scoring prompt + completion (RewardModelReward)."""

import pytest
import torch

from pmetal.errors import PmetalError
from pmetal.rewards import RewardModelReward, RewardSet


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama's config and tokenizer as a one-label LlamaForSequenceClassification."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("reward-model")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ between texts
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def _score_alone(path, text: str) -> float:
    """The model's logit for one unpadded text: what a batched, padded call must reproduce."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()


def test_batched_scores_equal_one_text_at_a_time(reward_model_dir):
    """Texts of different lengths in one padded batch score as they do alone (the score is read at
    each row's last real token, whatever the padding)."""
    prompts = ["What is 2 + 2?", "Name a colour.", "Say hi"]
    completions = [" 4", " Blue, like the sky on a clear and cloudless summer afternoon.", ""]
    reward = RewardModelReward(str(reward_model_dir), batch_size=3)
    scores = reward(prompts, completions)
    expected = [_score_alone(reward_model_dir, p + c) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3  # the check above is not comparing constants


def test_chat_prompts_use_the_reward_models_template(reward_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "4"}], tokenize=False)
    assert "<|im_start|>assistant" in text
    score = RewardModelReward(str(reward_model_dir))([prompt], ["4"])
    assert score == pytest.approx([_score_alone(reward_model_dir, text)], abs=1e-5)


def test_reward_set_from_cli_options_includes_the_model(reward_model_dir):
    rewards = RewardSet.from_specs((), reward_model=str(reward_model_dir))
    assert rewards.names == ["reward_model"] and rewards.weights == [1.0]
    total, per_function = rewards.score(["Hi"], [" there"])
    assert total == per_function["reward_model"]
    assert total == pytest.approx([_score_alone(reward_model_dir, "Hi there")], abs=1e-5)


def test_a_path_that_is_no_reward_model_is_a_clear_error(tmp_path):
    reward = RewardModelReward(str(tmp_path / "missing"))
    with pytest.raises(PmetalError, match="--reward-model .*missing.*sequence-classification"):
        reward(["Hi"], ["there"])
