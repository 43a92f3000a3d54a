"""Fine-tuning: cross-entropy against the teacher's predicted labels on the defense images, from its weights.

The public ASD code's ``CEwater`` main loss. The teacher labels the unlabelled images (argmax of its
logits); the student, a copy of the teacher, is trained on those labels with SGD (lr 0.01, momentum 0.9,
weight decay 5e-4, cosine) for 20 epochs, as NAD's fine-tuning baseline.
"""
from helper.defenses.base import FINE_TUNING, Defense, register_defense
from helper.train.losses import hard_label_ce


@register_defense
class FineTune(Defense):
    name = "finetune"
    label = "Fine-tuning"
    help = "fine-tuning: cross-entropy against the teacher's predicted labels (the public code's CEwater)"
    defaults = {**FINE_TUNING, "epoch": 20}

    def stages(self, student):
        optimizer = self.optimizer(student.parameters())

        def loss(s, t, x):
            ce = hard_label_ce(s, t)
            return ce, {"ce": ce.detach()}
        step = self.distill_step(student, self.teacher, loss, optimizer)
        return [self.make_stage("", self.args.epoch, student, optimizer, step)]
