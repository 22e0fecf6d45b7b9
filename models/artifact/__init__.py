"""The guard artifact: neuron selections and sets, probes with their scoring math, bundles.

The detector writes these files and the server reads them, both through this package;
`io` holds the digests and atomic writes every artifact file goes through.
"""
