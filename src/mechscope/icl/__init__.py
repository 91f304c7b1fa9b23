"""In-context learning beyond induction heads (issue 17). Submodules are imported directly
(``mechscope.icl.meta_train`` etc.); this file stays tiny so that the parts can be merged."""
