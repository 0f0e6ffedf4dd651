"""The loss on the answer tokens alone, with vocabulary logits computed only where that loss needs them (a few
positions per sample instead of every one, of 151,936 each): the same loss as the model's own, without a
(batch x length x vocabulary) fp32 tensor. The `answer_only_logits` setting turns it on (the Trainer that computes
it: curriculum/step.py's AnswerOnlyLossTrainer); curriculum/speed.py checks that the installed transformers still
takes `logits_to_keep` as it was written for."""

from __future__ import annotations

IGNORE_INDEX = -100  # label value that the loss skips (prompt, image and padding positions)


def answer_positions(labels):
    """Positions whose *next* token is trained (a causal LM predicts token t+1 at position t), as one index set
    for the whole batch (the union over rows, which any transformers version's `logits_to_keep` accepts), and the
    target of each row at each of them (-100 where that row trains nothing there)."""
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return keep, targets[:, keep]


def answer_loss(logits, targets, num_items_in_batch=None):
    """Cross-entropy in fp32 over the trained positions: a mean over them, or a sum divided by the token count of
    the whole accumulated batch when the Trainer gives one, exactly as transformers' causal-LM loss does."""
    import torch.nn.functional as F  # torch here, not at import: the recipe's --check and config errors skip it

    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return loss / (count.to(loss.device) if hasattr(count, "to") else count)


def answer_only_loss(model, inputs: dict, num_items_in_batch=None):
    """The model's forward with logits only at the answer positions (a few per sample instead of every one, of
    151,936 each); the same loss as the model's own. Returns (loss, outputs). Goes through the model's (or the
    DDP wrapper's) own forward, so gradient synchronisation and hooks behave as usual."""
    inputs = dict(inputs)
    keep, targets = answer_positions(inputs.pop("labels"))
    outputs = model(**inputs, logits_to_keep=keep)
    return answer_loss(outputs.logits, targets, num_items_in_batch), outputs
