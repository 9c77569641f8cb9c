"""The transfer settings, one folder each, every one implementing `tlpipe.setting.Setting`."""
