#!/usr/bin/env bash
# Push the built image to Amazon ECR, tagged with the git commit (make push). Not run in CI.
#
#   AWS_REGION=eu-west-1 scripts/push-image.sh                     # account from `aws sts get-caller-identity`
#   AWS_REGION=eu-west-1 AWS_ACCOUNT_ID=123456789012 ECR_REPOSITORY=maskrcnn-sagemaker scripts/push-image.sh
#
# Needs the AWS CLI v2 with credentials allowed to ecr:GetAuthorizationToken and push to the repository
# (created with CREATE_REPOSITORY=1 when missing). Pushes <registry>/<repo>:<git sha> and, with
# ALSO_LATEST=1, :latest. A dirty working tree gets a -dirty suffix so a pushed tag always names a commit
# exactly. Prints the pushed image URI (what a SageMaker training job / model uses) on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-maskrcnn-sagemaker:latest}
ECR_REPOSITORY=${ECR_REPOSITORY:-maskrcnn-sagemaker}
AWS_REGION=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}
CREATE_REPOSITORY=${CREATE_REPOSITORY:-0}
ALSO_LATEST=${ALSO_LATEST:-0}
DOCKER=${DOCKER:-/usr/bin/docker}
[[ -x $DOCKER ]] || DOCKER=$(command -v docker)

[[ -n $AWS_REGION ]] || { echo "push-image: set AWS_REGION" >&2; exit 1; }
command -v aws >/dev/null || { echo "push-image: the AWS CLI is not installed" >&2; exit 1; }
"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || { echo "push-image: $IMAGE not built (make build)" >&2; exit 1; }

AWS_ACCOUNT_ID=${AWS_ACCOUNT_ID:-$(aws sts get-caller-identity --query Account --output text)}
registry="$AWS_ACCOUNT_ID.dkr.ecr.$AWS_REGION.amazonaws.com"
tag=$(git rev-parse --short=12 HEAD)
if [[ -n $(git status --porcelain --untracked-files=no) ]]; then tag="$tag-dirty"; fi

if ! aws ecr describe-repositories --region "$AWS_REGION" --repository-names "$ECR_REPOSITORY" >/dev/null 2>&1; then
    if [[ $CREATE_REPOSITORY == 1 ]]; then
        aws ecr create-repository --region "$AWS_REGION" --repository-name "$ECR_REPOSITORY" \
            --image-scanning-configuration scanOnPush=true >/dev/null
    else
        echo "push-image: ECR repository $ECR_REPOSITORY not found in $AWS_REGION (CREATE_REPOSITORY=1 creates it)" >&2
        exit 1
    fi
fi

aws ecr get-login-password --region "$AWS_REGION" | "$DOCKER" login --username AWS --password-stdin "$registry"

targets=("$registry/$ECR_REPOSITORY:$tag")
if [[ $ALSO_LATEST == 1 ]]; then targets+=("$registry/$ECR_REPOSITORY:latest"); fi
for target in "${targets[@]}"; do
    "$DOCKER" tag "$IMAGE" "$target"
    "$DOCKER" push "$target"
done
echo "${targets[0]}"
