"""The losses of moe_align.ops.grpo against TRL's own trainers' loss code, not our reading of its
documentation.

grpo_loss: a tiny GRPOTrainer (a 1-layer Llama saved to disk, a word-level tokenizer) computes its
loss with ``_compute_loss`` on a hand-built batch; its forward pass is replaced by fixed per-token
log-probs, so both sides see the same ``logp``, ``old``, ``ref``, advantages and mask. The loss,
its gradient with respect to ``logp`` and the metrics TRL logs must equal ours for each mode's
TRL name (grpo_loss's docstring maps them), with the KL as eq. 33 writes it and weighted by the
ratio (TRL's use_bias_correction_kl, our unbiased_kl).

dpo_loss: end to end on the same tiny Llama. TRL's DPOTrainer tokenizes preference pairs, collates
them and runs its real forward (fused LM head) through policy and reference; we take the same
batch and models through linear_logprobs and dpo_loss. Loss, every parameter's gradient and the
reward metrics must agree.
"""

import pytest
import torch
from test_grpo import OURS_TO_TRL, make_batch

from moe_align.ops.grpo import TRL_LOSS_TYPES, dpo_loss, grpo_loss
from moe_align.ops.logprobs import linear_logprobs

trl = pytest.importorskip("trl")  # a test dependency: present in CI, so this runs
transformers = pytest.importorskip("transformers")
# TRL's package imports lazily: its trainers need datasets, accelerate and pandas too (all in CI;
# a GPU machine given only TRL's wheel skips here instead of failing)
pytest.importorskip("trl.trainer.grpo_trainer")
pytest.importorskip("trl.trainer.dpo_trainer")

# TRL still uses transformers' deprecated gradient-checkpointing names (the config argument, and
# is_gradient_checkpointing in DPOTrainer's reference forward)
pytestmark = [pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

TOL = dict(rtol=1e-5, atol=1e-6)
BATCH, LENGTH, MAX_COMPLETION = 8, 7, 11  # TRL's dr_grpo divides by max_completion_length, not the padded T
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "w1 w2" -> two tokens
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def trl_trainer(model_dir, output_dir, loss_type, use_bias_correction_kl):
    from datasets import Dataset

    args = trl.GRPOConfig(output_dir=str(output_dir), loss_type=loss_type, beta=BETA, epsilon=EPS_LOW,
                          epsilon_high=EPS_HIGH, num_generations=4, per_device_train_batch_size=BATCH,
                          max_completion_length=MAX_COMPLETION, report_to=[], use_cpu=True, bf16=False,
                          use_bias_correction_kl=use_bias_correction_kl)
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["w1 w2", "w3 w4"]}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.training_step in a real run
    return trainer


@pytest.mark.parametrize("mode", list(OURS_TO_TRL))
@pytest.mark.parametrize("unbiased_kl", [False, True])  # TRL's use_bias_correction_kl (True by default)
def test_loss_gradient_and_metrics_equal_trls(mode, unbiased_kl, model_dir, tmp_path):
    logp, old, ref, _, adv, mask = make_batch(batch=BATCH, length=LENGTH, seed=17, spread=0.5, empty_row=True)
    entropy = torch.rand(BATCH, LENGTH, generator=torch.Generator().manual_seed(18)) * 3
    other_ranks_tokens = 13  # dapo: num_items_in_batch counts the whole generation batch
    global_tokens = int(mask.sum()) + other_ranks_tokens

    assert TRL_LOSS_TYPES[mode] == OURS_TO_TRL[mode]  # the package's table, used by bench_grpo
    trainer = trl_trainer(model_dir, tmp_path, OURS_TO_TRL[mode], use_bias_correction_kl=unbiased_kl)
    theirs_logp = logp.clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (theirs_logp, entropy, None)
    inputs = {
        "prompt_ids": torch.ones(BATCH, 2, dtype=torch.long), "prompt_mask": torch.ones(BATCH, 2, dtype=torch.long),
        "completion_ids": torch.ones(BATCH, LENGTH, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(global_tokens)),
    }
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    ours_logp = logp.clone().requires_grad_()
    ours, metrics = grpo_loss(ours_logp, adv, mask, old, ref, eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA,
                              loss_type=mode, num_global_tokens=global_tokens, world_size=1,
                              max_len=MAX_COMPLETION, entropy=entropy, unbiased_kl=unbiased_kl)
    ours.backward()

    torch.testing.assert_close(ours, theirs.float(), **TOL)
    torch.testing.assert_close(ours_logp.grad, theirs_logp.grad, **TOL)
    assert ours_logp.grad.abs().sum() > 0
    for name in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name].item() == pytest.approx(logged[name], rel=1e-5, abs=1e-7), name
    # the batch straddles both clip bounds, so the clipping comparisons are not vacuous
    assert logged["clip_ratio/low_mean"] > 0 and logged["clip_ratio/high_mean"] > 0


# Five pairs of different prompt, chosen and rejected lengths, so the collated batch pads both
# the prompts and the completions.
PREFERENCE_PAIRS = {
    "prompt": ["w1 w2", "w5", "w6 w7 w8", "w9 w2", "w3"],
    "chosen": [" w3", " w4 w5 w6", " w10", " w11 w12", " w13 w14 w15 w16"],
    "rejected": [" w4 w5", " w7", " w20 w21 w22", " w11", " w13"],
}


def completion_logprobs(model, batch):
    """[2B] sums of each completion's token log-probs (TRL's batch: chosen rows, then rejected)."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    return linear_logprobs(hidden[:, :-1], model.lm_head.weight, targets).sum(-1)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_gradients_and_metrics_equal_trls_dpo_trainer(beta, model_dir, tmp_path):
    """TRL 1.16's "sigmoid" loss has no label smoothing (its "robust" loss is a different estimator),
    so conservative DPO (label_smoothing > 0) is checked against the oracle in test_grpo only."""
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid"], per_device_train_batch_size=5,
                         report_to=[], use_cpu=True, bf16=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer = trl.DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_dict(PREFERENCE_PAIRS),
                             processing_class=tokenizer)
    assert trainer.f_divergence_type == "reverse_kl" and trainer.ld_alpha is None and not trainer.use_weighting
    policy, reference = trainer.model, trainer.ref_model
    with torch.no_grad():  # move the policy away from the reference, so the rewards differ
        g = torch.Generator().manual_seed(19)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    policy.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 10 and (batch["attention_mask"] == 0).any()

    theirs = trainer._compute_loss(policy, batch, return_outputs=False)
    theirs.backward()
    their_grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    policy.zero_grad()

    logps = completion_logprobs(policy, batch)
    with torch.no_grad():
        ref_logps = completion_logprobs(reference, batch)
    ours, metrics = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=beta)
    ours.backward()

    torch.testing.assert_close(ours, theirs.float(), **TOL)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, their_grads[name], **TOL, msg=name)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert metrics[name].item() == pytest.approx(logged[name], rel=1e-5, abs=1e-7), name
    assert 0 < logged["rewards/accuracies"] < 1  # some pairs are ranked right and some wrong
