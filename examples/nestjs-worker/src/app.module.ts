import { Module } from '@nestjs/common';
import { BullModule } from '@nestjs/bullmq';
import { ProvisioningProcessor } from './provisioning.processor';

@Module({
  imports: [
    BullModule.forRoot({
      // The same Redis and prefix as switchyard's queue sink (`redis.url`, `sinks.<name>.prefix`).
      // Workers need `maxRetriesPerRequest: null` so their blocking commands are not cut short.
      connection: { url: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', maxRetriesPerRequest: null },
      prefix: process.env.BULL_PREFIX ?? 'bull',
    }),
    // The sink's `queue`.
    BullModule.registerQueue({ name: 'provisioning' }),
  ],
  providers: [ProvisioningProcessor],
})
export class AppModule {}
