"""Your own attacks, outside the advews package: ``advews-eval --attack attacks.multi_targeted:MultiTargetedPGD``
or, in a recipe after gin's ``import attacks.multi_targeted``, ``AT.attack = @MultiTargetedPGD``; both import
from the directory the tool runs in (it is put first on sys.path)."""
