"""AWS's documented limits that the plan checks before a build and publish checks again on
what it reads from an output directory (pure: no AWS client here)."""

from __future__ import annotations

import re

# EnableImageDeprecation: "The upper limit for DeprecateAt is 10 years from now, except for
# public AMIs, where the upper limit is 2 years from the creation date."
# https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_EnableImageDeprecation.html
MAX_DEPRECATION_DAYS = 3650
MAX_PUBLIC_DEPRECATION_DAYS = 730

# PutParameter's Name: letters, digits and _.-, with / between the levels of a hierarchy;
# "For parameters in a hierarchy, you must include a leading forward slash"; "limited to a
# maximum depth of fifteen levels"; "can't be prefixed with aws or ssm (case-insensitive)";
# "The maximum length for the fully qualified parameter name is 1011 characters."
# https://docs.aws.amazon.com/systems-manager/latest/APIReference/API_PutParameter.html
SSM_NAME = re.compile(r"^(/[A-Za-z0-9_.-]+){1,15}$|^[A-Za-z0-9_.-]+$")
SSM_NAME_MAX = 1011

ACCOUNT_ID = re.compile(r"^\d{12}$")

# ModifySnapshotAttribute: "You can make up to 500 modifications to a snapshot in a single
# operation." https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ModifySnapshotAttribute.html
SNAPSHOT_PERMISSION_BATCH = 500


def ssm_name_problem(name: str) -> str | None:
    if len(name) > SSM_NAME_MAX:
        return f"SSM parameter names may be at most {SSM_NAME_MAX} characters"
    if not SSM_NAME.match(name):
        return ("not an SSM parameter name: letters, digits and _ . - with / between levels "
                "(a hierarchy starts with /, at most 15 levels)")
    if name.lstrip("/").lower().startswith(("aws", "ssm")):
        return "SSM parameter names may not begin with aws or ssm"
    return None


def deprecation_limit_days(public: bool) -> int:
    return MAX_PUBLIC_DEPRECATION_DAYS if public else MAX_DEPRECATION_DAYS

# LaunchPermission's OrganizationArn / OrganizationalUnitArn
# https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_LaunchPermission.html
ORGANIZATION_ARN_PATTERN = (r"^arn:aws[a-z-]*:organizations::\d{12}:"
                            r"organization/o-[a-z0-9]{10,32}$")
OU_ARN_PATTERN = (r"^arn:aws[a-z-]*:organizations::\d{12}:"
                  r"ou/o-[a-z0-9]{10,32}/ou-[a-z0-9]{4,32}-[a-z0-9]{8,32}$")
ORGANIZATION_ARN = re.compile(ORGANIZATION_ARN_PATTERN)
OU_ARN = re.compile(OU_ARN_PATTERN)

# "You can assign a maximum of 50 tags to each resource"; publish adds 4 amiforge:* tags
# to the AMI, and to each snapshot those 4, amiforge:image-id and amiforge:block-index-sha256
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/Using_Tags.html#tag-restrictions
AMIFORGE_SNAPSHOT_TAGS = 6
MAX_RECIPE_TAGS = 50 - AMIFORGE_SNAPSHOT_TAGS
