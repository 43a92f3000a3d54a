"""NAD, Neural Attention Distillation (ICLR 2021), adapted to unlabelled out-of-distribution defense data.

Stage 1 fine-tunes a copy of the backdoored teacher with KD on the defense images (NAD's "teacher");
stage 2 trains the student (from the backdoored teacher) with KD against the stage-1 model plus
``sum_l beta_l * ||A(F_s,l) - A(F_t,l)||^2`` at the outputs of layer2, layer3 and layer4 (betas 500, 1000,
1000; ``helper.train.losses.attention_map``). NAD trains with labels and cross-entropy at lr 0.1; here both
stages use the package's KD loss instead (there are no labels) and SGD at lr 0.01 with Nesterov momentum 0.9
(its optimiser, ``nesterov=True``; see docs/defenses.md).

Adapted to unlabelled data, stage 1 distils a copy of the teacher from the identical teacher: the two differ
only through the copy's batch statistics in training mode and its weight decay, so its KD loss starts near 0,
the stage-1 model stays close to the backdoored teacher, and stage 2 copies that teacher's attention. NAD's paper fine-tunes on labelled clean
data, which is what moves its stage-1 teacher away from the backdoor; this port has no such signal.
"""
import copy

from helper.defenses.base import Defense, register_defense
from helper.run.cli import NONNEGATIVE, POSITIVE, Option
from helper.run.errors import UserError
from helper.train.features import FeatureHooks
from helper.train.losses import attention_distillation_loss


@register_defense
class NAD(Defense):
    name = "nad"
    label = "NAD"
    help = "NAD: fine-tune a teacher copy with KD, then distil with attention maps of layer2-4 against it"
    defaults = {"opt_lr": 0.01, "weight_decay": 5e-4, "epoch": 20, "batch_size": 64, "lr_drop": "off",
                "opt_nesterov": 1}

    options = (
        Option("--nad_teacher_epochs", 10, "stage 1: epochs of KD fine-tuning of the teacher copy (NAD: 5-10)",
               type=int, range=NONNEGATIVE),
        Option("--nad_layers", "layer2,layer3,layer4", "modules whose outputs are compared", type=str),
        Option("--nad_betas", (500.0, 1000.0, 1000.0), "weight of the attention loss of each of --nad_layers",
               nargs="+", range=NONNEGATIVE),
        Option("--nad_p", 2.0, "attention map A = sum over channels of |F|^p", range=POSITIVE),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hooks = []  # the student's and NAD teacher's feature hooks, made by stages()

    @classmethod
    def check(cls, args):
        super().check(args)
        layers = [s.strip() for s in args.nad_layers.split(",") if s.strip()]
        if len(layers) != len(args.nad_betas):
            raise UserError(f"--nad_betas has {len(args.nad_betas)} values for {len(layers)} --nad_layers")

    def stages(self, student):
        a, c = self.args, self.config
        layers = [s.strip() for s in c.nad_layers.split(",") if s.strip()]
        nad_teacher = copy.deepcopy(self.teacher).requires_grad_(True)
        opt_teacher = self.optimizer(nad_teacher.parameters())
        finetune = self.distill_step(nad_teacher, self.teacher, lambda s, t, x: (self.kd(s, t), {}), opt_teacher)
        optimizer = self.optimizer(student.parameters())
        self.hooks = [FeatureHooks(student, layers), FeatureHooks(nad_teacher, layers)]

        def hooks_on(on):
            def begin(epoch):
                self.hooks[0].enabled = self.hooks[1].enabled = on
                nad_teacher.train(not on)  # stage 2: NAD's teacher is frozen, in eval mode
                return {}
            return begin

        def loss(s, t, x):
            s_feats, t_feats = self.hooks[0].pop(), self.hooks[1].pop()
            at = sum(beta * attention_distillation_loss(s_feats[n], t_feats[n], c.nad_p)
                     for beta, n in zip(c.nad_betas, self.hooks[0].layers))
            return self.kd(s, t) + at, {"at_loss": at.detach()}
        distill = self.distill_step(student, nad_teacher, loss, optimizer)
        return [self.make_stage("nad_teacher", c.nad_teacher_epochs, nad_teacher, opt_teacher, finetune, hooks_on(False)),
                self.make_stage("", a.epoch, student, optimizer, distill, hooks_on(True))]

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []
