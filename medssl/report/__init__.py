"""The end-to-end demo (``medssl demo``): orchestration (``demo``), its figures (``figures``) and ``report.md``
(``markdown``)."""
