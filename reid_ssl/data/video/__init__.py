"""Videos to person tracklets: the person detector registry and the tracker."""
