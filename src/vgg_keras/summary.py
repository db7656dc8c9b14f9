"""`vgg-keras summary`: the layer table of a configuration, its parameters and multiply-adds."""

from .model import build_vgg, multiply_adds


def print_summary(config, input_size=224, num_classes=1000):
    model = build_vgg(config, num_classes=num_classes, input_shape=(input_size, input_size, 3))
    print(f"{'layer':<16}{'output shape':<24}{'params':>14}")
    for layer in model.layers[1:]:
        shape = "x".join(str(d) for d in layer.output.shape[1:])
        print(f"{layer.name:<16}{shape:<24}{layer.count_params():>14,}")
    print(f"configuration {model.name}: {model.count_params():,} parameters, "
          f"{multiply_adds(model) / 1e9:.2f} G multiply-adds at {input_size}x{input_size}")
    return model
