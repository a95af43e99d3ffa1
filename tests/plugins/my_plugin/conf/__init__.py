# Makes the config folder importable: hydra.searchpath=[pkg://my_plugin.conf]
