"""SN-Tune and RSN-Tune: fine-tune only the safety neurons' weights, plus deactivation and evaluation.

Every entry of the model that does not belong to a tuned neuron keeps its exact value, so a
tuned checkpoint differs from its base in a few rows and columns that `tune.json` accounts for.
"""
