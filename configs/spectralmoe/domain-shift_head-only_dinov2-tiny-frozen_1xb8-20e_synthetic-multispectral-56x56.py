# Domain-shift benchmark, variant (a): the frozen stand-in foundation and
# the UPerHead only; nothing but the head trains. The reference the
# adapters have to beat. See configs/_base_/domain_shift_synthetic-multispectral.py
# and tools/analysis_tools/domain_shift.py.
_base_ = ['../_base_/domain_shift_synthetic-multispectral.py']
