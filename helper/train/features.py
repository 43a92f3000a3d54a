"""Forward hooks that capture the activations ASL needs, by module name (SPEC section 4)."""
import fnmatch

import torch

from helper.run.errors import UserError

# The first convolution of every residual block: layer1.0.conv1 ... layer4.1.conv1 (8 for ResNet18).
DEFAULT_LAYERS = ("layer*.*.conv1",)


def resolve_layers(model, patterns):
    """Module names matching each pattern (exact names or shell-style globs), in model order.

    A pattern that names nothing raises a UserError that names it and lists what exists.
    """
    names = [n for n, _ in model.named_modules() if n]
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            convs = [n for n in names if n.endswith("conv1") or n.endswith("conv2")]
            raise UserError(f"hooked layer {pattern!r} does not exist in the model; "
                            f"convolution layers are: {', '.join(convs)}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]


class FeatureHooks:
    """Keep the output of the named modules of one model during its forward pass.

    Registered once; ``features`` maps layer name to the last output (only these layers, only the
    last batch). ``local``: each convolution's output is computed again from its input detached, so a loss on
    it moves that convolution's weights and nothing before it (one more convolution per layer). Storing is switched off with ``enabled = False`` so that no activation is held
    when ASL is not computed. Use as a context manager, or call ``remove()``.
    """

    def __init__(self, model, patterns=DEFAULT_LAYERS, local=False):
        self.layers = resolve_layers(model, patterns)
        self.features = {}
        self.enabled = True
        modules = dict(model.named_modules())
        if local:
            others = [n for n in self.layers if not isinstance(modules[n], torch.nn.Conv2d)]
            if others:
                raise UserError(f"a local shift (--shift_grad local) needs convolution layers; "
                                f"{', '.join(others)} {'is' if len(others) == 1 else 'are'} not")
        self._handles = [modules[name].register_forward_hook(self._hook(name, local)) for name in self.layers]

    def _hook(self, name, local=False):
        def hook(module, inputs, output):
            if self.enabled:  # local: the same values, with a gradient that reaches this convolution's weights only
                self.features[name] = module._conv_forward(inputs[0].detach(), module.weight, module.bias) \
                    if local else output
        return hook

    def pop(self):
        """Return the captured features and forget them."""
        features, self.features = self.features, {}
        return features

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.features = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
