import 'reflect-metadata';
import { NestFactory } from '@nestjs/core';
import { AppModule } from './app.module';

async function bootstrap(): Promise<void> {
  // A worker process: no HTTP server, just the queue consumers. SIGTERM closes the workers, which lets
  // the job in hand finish (BullMQ's graceful close).
  const app = await NestFactory.createApplicationContext(AppModule);
  app.enableShutdownHooks();
}

void bootstrap();
