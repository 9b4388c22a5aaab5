"""Pure computation of the study (no Ray, no MLflow): the analyses the drivers in ``study/`` run.

Modules:

* ``hooks``: retain and edit named layers' outputs (zero or scale units).
* ``evaluation``: build a model from a state dict; one plain evaluation pass
  (per-class correct counts) and the device/batch helpers the analyses share.
* ``counts``: the count records (``ClassCounts``, ``AblationCounts``): merging, state-dict round trip.
* ``ablation``: the per-unit ablation engine (``ablate_units``, ``ablate_unit_set``, the naive reference).
* ``rankings``: tables and rankings of ablation counts with their paired tests (``ALPHA``).
* ``intervention``: damp or boost chosen units; the paper's Table 1 protocol.
* ``concepts``: concept sets, the shapes dataset's concept label maps, concept batches (loaded as read).
* ``broden``: reader for Broden-format concept data.
* ``upsample``: bilinear upsampling of activation maps to the concept-mask resolution.
* ``activations``: a layer's unit maps batch by batch, in bounded chunks (both dissection passes).
* ``thresholds``: dissection pass 1, each unit's exact quantile threshold (top_k or radix histogram).
* ``dissection``: network dissection pass 2 (IoU counts) and unit labels.
* ``stats``: exact McNemar, Benjamini-Hochberg, paired intervals.
* ``tables``: the paper's Table 2 and the accuracy figures.
* ``figures``: every figure the kit writes (data in, PNG paths out).
"""
