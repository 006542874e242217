"""What a build hands over: the AMI manifests, the build manifest, the instance-store
bundle (and reading one back)."""
