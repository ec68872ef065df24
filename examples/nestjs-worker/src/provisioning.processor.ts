import { Logger } from '@nestjs/common';
import { OnWorkerEvent, Processor, WorkerHost } from '@nestjs/bullmq';
import { Job } from 'bullmq';

/** The job data the shipped rules (rules/orders.yaml, route provision-on-activating) put in `job`. */
export interface ProvisionOrder {
  sfOrderId: string;
  accountId: string | null;
  /** The action's idempotency key; also the BullMQ job id. */
  idempotencyKey: string;
  correlationId: string;
}

@Processor('provisioning', { concurrency: 4 })
export class ProvisioningProcessor extends WorkerHost {
  private readonly logger = new Logger(ProvisioningProcessor.name);

  // Attempts, backoff and removal come from the job (the sink's `job_options`): a thrown error retries it.
  async process(job: Job<ProvisionOrder>): Promise<{ provisioned: string }> {
    if (job.name !== 'provision-order') {
      throw new Error(`unexpected job name ${job.name}`);
    }
    const { sfOrderId, correlationId, idempotencyKey } = job.data;
    this.logger.log(`provisioning order ${sfOrderId} (job ${job.id}, correlation ${correlationId})`);
    // Call the provisioning system here, passing idempotencyKey so a retried job does not provision twice.
    void idempotencyKey;
    return { provisioned: sfOrderId };
  }

  @OnWorkerEvent('failed')
  onFailed(job: Job<ProvisionOrder> | undefined, error: Error): void {
    this.logger.error(`job ${job?.id} failed (attempt ${job?.attemptsMade}): ${error.message}`);
  }
}
