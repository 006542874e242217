"""The AMI lifecycle against the AWS APIs with boto3: publish (upload + register), share,
copy, deregister. Credentials and region come from boto3's normal chain."""
