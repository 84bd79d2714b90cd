"""Your own defenses, outside the advews package: a recipe loads one with gin's ``import
defenses.logit_pairing``, from the directory advews-train runs in (it is put first on sys.path)."""
