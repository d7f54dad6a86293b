"""The lab report's numbers (../shared/SPEC.md), defined once: the report sets ours beside them and the tests
hold the models to the parameter counts, which are exact targets.

Example:
    >>> REFERENCE["classifier_total"] == sum(REFERENCE["classifier_layers"])
    True
"""

REFERENCE = {
    "classifier_total": 1_128_997,
    "classifier_layers": [9472, 256, 0, 0, 73856, 512, 0, 147584, 512, 0, 0, 295168, 1024, 0, 590080, 1024, 0, 0,
                          0, 0, 9509],
    "stages": [
        {"params": (212_483, 212_227, 256), "seconds": 660, "train_loss": 0.0023},
        {"params": (931_843, 920_963, 10_880), "seconds": 1020, "train_loss": 0.0035},
        {"params": (3_148_803, 2_913_923, 234_880), "seconds": 1110, "train_loss": 0.0057},
    ],
    "test_mse": 0.0055,
    "scratch": {"test_loss": 1.0759, "test_accuracy": 0.6678, "epochs": 66},
    "pretrained": {"test_loss": 1.2430, "test_accuracy": 0.6545, "epochs": 34},
    "prediction": [("Bombay", 0.99999905), ("scottish_terrier", 9.24e-07), ("Siamese", 1.51e-09)],
}
