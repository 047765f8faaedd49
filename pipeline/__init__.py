"""AWS automation for the Mask R-CNN SageMaker image: ECR build and Step Functions workflow.

The package renders plain artefacts and leaves deployment to boto3:

* ``workflow.py``  - the Amazon States Language definition (build -> train -> deploy)
* ``template.py``  - the CloudFormation template of the stack (ECR, S3, CodeBuild, Lambda, state machine, IAM)
* ``build_lambda.py`` - the handler of the build Lambda (ECR repository, build context, CodeBuild)
* ``execution.py`` - the typed execution input and its example
* ``shapes.py``    - offline validation of SageMaker task Parameters against botocore's request shapes
* ``release.py``   - promotion of a tested image digest to a release tag (retag, no rebuild)
* ``aws.py``       - ``deploy`` and ``start`` with boto3

Run ``python -m pipeline --help``; docs/pipeline.md is the manual.
"""
