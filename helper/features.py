"""Forward hooks that capture the activations ASL needs, by module name (SPEC section 4)."""
import fnmatch

from helper.errors import UserError

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
    last batch). Storing is switched off with ``enabled = False`` so that no activation is held
    when ASL is not computed. Use as a context manager, or call ``remove()``.
    """

    def __init__(self, model, patterns=DEFAULT_LAYERS):
        self.layers = resolve_layers(model, patterns)
        self.features = {}
        self.enabled = True
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.enabled:
                self.features[name] = output
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
